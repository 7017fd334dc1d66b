"""The routing-health summary and drift on hand-built traces whose answers are known."""

import json
import math
from dataclasses import replace

import pytest
import torch

from moekit.analysis.drift import routing_drift
from moekit.analysis.health import HealthOptions, domain_nmi_per_layer, json_ready, routing_health, token_runs
from moekit.analysis.trace import LayerTrace, RoutingTrace
from moekit.errors import ConfigError, MoekitError

ROWS, COLS, EXPERTS = 40, 32, 8


def layer(experts, name, dropped=None, activation_max=None):
    n = experts.shape[0]
    return LayerTrace(
        name=name,
        num_experts=EXPERTS,
        num_compute_experts=EXPERTS,
        experts=experts,
        weights=torch.where(experts >= 0, 0.5, 0.0),
        dropped=torch.zeros_like(experts, dtype=torch.bool) if dropped is None else dropped,
        entropy=torch.full((n,), math.log(2)),
        margin=torch.full((n,), 0.1),
        activation_max=activation_max,
        activation_token=None if activation_max is None else torch.zeros(EXPERTS, dtype=torch.long),
    )


def trace_of(layers, seed=0):
    """ROWS sequences of COLS tokens, one document and one domain (row % 4) per row."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(ROWS).repeat_interleave(COLS)
    return RoutingTrace(
        token_ids=torch.randint(0, 100, (ROWS * COLS,), generator=generator),
        positions=torch.arange(COLS).repeat(ROWS),
        columns=torch.arange(COLS).repeat(ROWS),
        sequences=rows,
        doc_ids=rows,
        domains=rows % 4,
        layers=layers,
        domain_names=("a", "b", "c", "d"),
    )


def domain_experts():
    """Each domain d uses its own two experts {2d, 2d+1}; which one comes first varies."""
    domains = torch.arange(ROWS).repeat_interleave(COLS) % 4
    flip = torch.arange(ROWS * COLS) % 3 == 0
    return torch.stack([2 * domains + flip.long(), 2 * domains + (~flip).long()], dim=1)


def random_experts(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(EXPERTS, generator=generator)[:2] for _ in range(ROWS * COLS)])


def test_domain_specialised_layer_against_a_random_one():
    trace = trace_of([layer(domain_experts(), "specialised"), layer(random_experts(1), "random")])
    health = routing_health(trace, HealthOptions(segment_lengths=(4,)))
    specialised, random = health["layers"]
    assert specialised["domains"]["nmi_top1"] == pytest.approx(1.0)
    assert all(share == pytest.approx(1.0) for share in specialised["domains"]["top2_share"].values())
    assert random["domains"]["nmi_top1"] < 0.02
    assert domain_nmi_per_layer(trace) == [specialised["domains"]["nmi_top1"], random["domains"]["nmi_top1"]]
    # four domains in equal shares, two experts each: the load is exactly even
    assert specialised["load"]["cv"] == 0.0 and specialised["load"]["dead"] == []
    assert health["summary"]["mean_domain_nmi"] == pytest.approx((1.0 + random["domains"]["nmi_top1"]) / 2)


def test_dead_and_overloaded_experts_and_drops_towards_the_end():
    experts = random_experts(2)
    experts[experts == 7] = 0  # expert 7 never chosen, expert 0 chosen twice as often
    experts[:, 1] = torch.where(experts[:, 1] == experts[:, 0], -1, experts[:, 1])
    dropped = torch.zeros_like(experts, dtype=torch.bool)
    late = torch.arange(COLS).repeat(ROWS) >= 24
    dropped[late, 1] = experts[late, 1] >= 0
    trace = trace_of([layer(experts, "l0", dropped)])
    health = routing_health(trace, HealthOptions(segment_lengths=(4,), position_bin=8, overload_factor=1.5))
    result = health["layers"][0]
    assert result["load"]["dead"] == [7]
    assert result["load"]["overloaded"] == [0]
    rates = result["drops"]["by_position"]["rates"]
    assert rates[:3] == [0.0, 0.0, 0.0] and rates[3] > 0.4
    assert result["drops"]["rate"] == pytest.approx(int(dropped.sum()) / int((experts >= 0).sum()))


def test_constant_routing_within_sequences_is_perfectly_consistent_and_cacheable():
    rows = torch.arange(ROWS).repeat_interleave(COLS)
    constant = torch.stack([rows % EXPERTS, (rows + 1) % EXPERTS], dim=1)
    trace = trace_of([layer(constant, "l0")])
    health = routing_health(trace, HealthOptions(segment_lengths=(4, 16)))
    result = health["layers"][0]
    assert result["consistency"]["srp"] == {"4": pytest.approx(1.0), "16": pytest.approx(1.0)}
    assert result["consistency"]["sch"]["16"][1:] == [1.0] * (EXPERTS - 1)
    # a 2-expert LRU cache misses both experts of the first row, then one per new row (row r + 1
    # keeps expert (r + 1) % E of row r)
    assert result["cache"]["lru"][1] == pytest.approx(1 - (2 + ROWS - 1) / (2 * ROWS * COLS))


def test_cross_layer_copy_and_super_experts():
    first = random_experts(3)
    peaks = torch.ones(EXPERTS)
    peaks[5] = 1000.0
    trace = trace_of(
        [
            layer(first, "a", activation_max=torch.ones(EXPERTS)),
            layer((first + 3) % EXPERTS, "b", activation_max=peaks),
        ]
    )
    health = routing_health(trace, HealthOptions(segment_lengths=(4,)))
    (pair,) = health["cross_layer"]
    assert pair["top1_nmi"] == pytest.approx(1.0) and pair["top_partner_rate"] == pytest.approx(1.0)
    found = health["super_experts"]["super_experts"]
    assert [(s["layer"], s["expert"]) for s in found] == [("b", 5)]
    assert found[0]["ratio_to_median"] == pytest.approx(1000.0)


def test_token_runs_break_at_rows_documents_and_gaps():
    trace = trace_of([layer(random_experts(4), "l0")])
    runs = token_runs(trace)
    assert int(runs.max()) == ROWS - 1
    trace.doc_ids[5:] += 1000  # a second document starts at token 5
    trace.columns[10:] += 1  # padding removed between tokens 9 and 10
    runs = token_runs(trace)
    assert runs[:12].tolist() == [0] * 5 + [1] * 5 + [2] * 2


def test_drift_between_traces():
    # token ids that never cross domains, so each id has a clear majority expert
    ids = torch.arange(COLS).repeat(ROWS) + COLS * (torch.arange(ROWS).repeat_interleave(COLS) % 4)
    trace = replace(trace_of([layer(domain_experts(), "l0")]), token_ids=ids)
    same = routing_drift(trace, trace)["layers"][0]
    assert same["top1_agreement"] == 1.0 and same["topk_jaccard"] == 1.0 and same["load_js_divergence"] == 0.0
    assert same["token_map_agreement"] == 1.0
    shifted = replace(trace_of([layer((domain_experts() + 2) % EXPERTS, "l0")]), token_ids=ids)
    moved = routing_drift(trace, shifted)["layers"][0]
    assert moved["top1_agreement"] == 0.0 and moved["token_map_agreement"] == 0.0
    assert moved["domain_nmi_b"] == pytest.approx(1.0)  # still specialised, on other experts
    with pytest.raises(MoekitError, match="different tokens"):
        routing_drift(trace, trace_of([layer(domain_experts(), "l0")], seed=9))


def test_json_ready_and_options():
    health = routing_health(trace_of([layer(random_experts(5), "l0")]), HealthOptions(segment_lengths=(64,)))
    assert math.isnan(health["layers"][0]["consistency"]["srp"]["64"])  # no window of 64 in 32-token rows
    text = json.dumps(json_ready(health), allow_nan=False)
    assert json.loads(text)["layers"][0]["consistency"]["srp"]["64"] is None
    with pytest.raises(ConfigError, match="segment_lengths"):
        HealthOptions(segment_lengths=(0,))
