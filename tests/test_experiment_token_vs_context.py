"""`moekit experiment token-vs-context` (#56, #21): purities, map overlap and drop-by-position
against hand-made traces, the capacity switch on a real model, the verdict rules on made-up runs,
and the quick path end to end."""

import json

import numpy as np
import pytest
import torch

from moekit import cli
from moekit.analysis.trace import LayerTrace, RoutingTrace
from moekit.experiments import token_vs_context
from moekit.experiments.stats import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


def hand_trace(top1: list[int], token_ids: list[int], domains: list[int], dropped_columns=()) -> RoutingTrace:
    n = len(top1)
    experts = torch.tensor([[e, (e + 1) % 4] for e in top1])
    columns = torch.arange(n) % 8
    dropped = torch.zeros(experts.shape, dtype=torch.bool)
    for column in dropped_columns:
        dropped[columns == column, 1] = True
    layer = LayerTrace(
        "l0", 4, 4, experts, torch.full(experts.shape, 0.5), dropped, torch.zeros(n), torch.zeros(n)
    )
    return RoutingTrace(
        torch.tensor(token_ids), columns, columns, torch.arange(n) // 8, torch.arange(n) // 8,
        torch.tensor(domains), [layer], ("a", "b"),
    )  # fmt: skip


def test_purities_and_map_overlap_of_token_id_routing():
    ids = [0, 1, 2, 3] * 8
    domains = [0] * 16 + [1] * 16
    by_id = hand_trace([i for i in ids], ids, domains)  # the expert is the token id, whatever the domain
    measured = token_vs_context.purities(by_id)
    assert measured["token_purity"] == [1.0]
    assert measured["domain_purity"] == [pytest.approx(0.25)]  # each domain spreads over 4 experts
    assert token_vs_context.map_overlap(by_id, by_id) == [1.0]
    shifted = hand_trace([(i + 1) % 4 for i in ids], ids, domains)  # every id moved to another expert
    assert token_vs_context.map_overlap(by_id, shifted) == [0.0]
    half = hand_trace([i if i < 2 else (i + 1) % 4 for i in ids], ids, domains)
    assert token_vs_context.map_overlap(by_id, half) == [pytest.approx(2 / 6)]  # 2 shared of 6 pairs


def test_late_minus_early_against_a_float64_count():
    ids = [0, 1, 2, 3] * 8
    trace = hand_trace(ids, ids, [0] * 32, dropped_columns=(6, 7))  # second choices of the last quarter
    drops = token_vs_context.late_minus_early(trace, seq_len=8)
    assert drops["assignments"] == [16, 16, 16, 16]  # 4 rows x 2 columns x 2 choices per quarter
    assert drops["rates"] == pytest.approx([0.0, 0.0, 0.0, 0.5])
    assert drops["late_minus_early"] == pytest.approx(0.5)


def test_capacity_switch_drops_late_tokens_first_and_restores_the_router():
    from moekit.analysis import record_routing
    from moekit.data.batch import Batch
    from moekit.models.lm import LanguageModel, LMConfig

    torch.manual_seed(0)
    config = LMConfig.from_dict(token_vs_context.moe_model(token_vs_context.QUICK) | {"vocab_size": 64})
    model = LanguageModel(config)
    ids = torch.randint(0, 64, (1, 64))
    batch = Batch(
        ids, ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids),
        torch.arange(64)[None], torch.zeros_like(ids),
    )  # fmt: skip
    before = [
        moe.router.spec for moe in model.modules() if hasattr(moe, "router") and hasattr(moe.router, "spec")
    ]
    assert before and all(spec.capacity_factor is None for spec in before)
    dropless = record_routing(model, [batch])
    assert not any(bool(layer.dropped.any()) for layer in dropless.layers)
    results = {}
    for policy in token_vs_context.POLICIES:
        torch.manual_seed(1)
        with token_vs_context.capacity(model, 1.0, policy):
            results[policy] = record_routing(model, [batch])
    after = [
        moe.router.spec for moe in model.modules() if hasattr(moe, "router") and hasattr(moe.router, "spec")
    ]
    assert after == before
    position, random = results["position"].layers[0], results["random"].layers[0]
    assert bool(position.dropped.any())  # an untrained router is uneven enough to overflow capacity 1.0
    assert torch.equal(position.experts, dropless.layers[0].experts)  # capacity keeps the choices
    assert not torch.equal(position.dropped, random.dropped)
    # position priority: every second choice is dropped before any first choice, later tokens first
    rise = token_vs_context.late_minus_early(results["position"], 64)["late_minus_early"]
    assert rise > 0


def fake_runs(token: float, overlap: float, rise: float, flat: float, spread: float = 0.01) -> list[dict]:
    return [
        {
            "seed": seed,
            "token_purity": [token + spread * seed, token],
            "domain_purity": [0.3, 0.3],
            "early_token_purity": [token, token],
            "map_overlap": [overlap + spread * seed, overlap],
            "drops": {
                "position": {"rates": [0.1, 0.1, 0.1, 0.1 + rise], "late_minus_early": rise + spread * seed},
                "random": {"rates": [0.1, 0.1, 0.1, 0.1 + flat], "late_minus_early": flat + spread * seed},
            },
        }
        for seed in range(3)
    ]


def test_verdicts_follow_the_intervals():
    outcome = token_vs_context.outcome(fake_runs(0.9, 0.9, 0.2, 0.0, spread=0.002), token_vs_context.QUICK, 3)
    assert [c.verdict for c in outcome.checks] == [REPRODUCED] * 5 and outcome.verdict == REPRODUCED
    outcome = token_vs_context.outcome(fake_runs(0.5, 0.2, -0.1, 0.3), token_vs_context.QUICK, 3)
    verdicts = [c.verdict for c in outcome.checks]
    assert verdicts == [REPRODUCED, NOT_REPRODUCED, NOT_REPRODUCED, NOT_REPRODUCED, NOT_REPRODUCED]
    edge = token_vs_context.outcome(fake_runs(0.9, 0.9, 0.2, 0.02, spread=0.05), token_vs_context.QUICK, 3)
    assert edge.checks[4].verdict == INCONCLUSIVE


def test_quick_run_end_to_end(tmp_path):
    assert (
        cli.main(["experiment", "token-vs-context", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["experiment"] == "token-vs-context" and len(results["checks"]) == 5
    assert results["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
    for run in results["results"]["runs"]:
        assert len(run["token_purity"]) == token_vs_context.QUICK.layers
        assert all(0 < v <= 1 for v in run["token_purity"] + run["domain_purity"] + run["early_token_purity"])
        assert all(0 <= v <= 1 for v in run["map_overlap"])
        assert run["early_step"] == 4  # 10% of 40 steps
        for policy in token_vs_context.POLICIES:
            rates = run["drops"][policy]["rates"]
            assert len(rates) == 4 and all(0 <= r <= 1 for r in rates)
    position = np.mean([r["drops"]["position"]["late_minus_early"] for r in results["results"]["runs"]])
    random = np.mean([r["drops"]["random"]["late_minus_early"] for r in results["results"]["runs"]])
    assert position > random  # position priority drops later tokens more than random priority does
    assert "Token ids vs context" in (tmp_path / "report.html").read_text()
