"""Routing statistics (masks, dropped assignments, sequences, additivity) and balance diagnostics on
hand-built routings with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.balance import RoutingStats, SequenceStats, diagnose, routing_probabilities, sequence_index
from moekit.balance.diagnostics import dead_experts, drop_rate, load_cv, max_over_mean_load
from moekit.errors import MoekitError
from moekit.routing.record import Assignments, Routing
from moekit.routing.spec import RouterSpec, preset
from moekit.routing.token_choice import TokenChoiceRouter

F64 = torch.float64


def assignments(pairs: list[tuple[int, int]]) -> Assignments:
    """(token, expert) pairs, sorted by expert as the record requires, weight 1, rank 0."""
    pairs = sorted(pairs, key=lambda p: p[1])
    token = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    expert = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return Assignments(
        token, expert, torch.ones(len(pairs), dtype=F64), torch.zeros(len(pairs), dtype=torch.long)
    )


def hand_routing(logits, kept, dropped, mask, num_compute_experts=None) -> Routing:
    logits = torch.tensor(logits, dtype=F64)
    return Routing(
        logits=logits,
        scores=torch.softmax(logits, -1),
        kept=assignments(kept),
        dropped=assignments(dropped),
        token_mask=torch.tensor(mask),
        num_compute_experts=num_compute_experts or logits.shape[1],
    )


def test_stats_count_chosen_assignments_of_real_tokens_only():
    # token 2 is padding with garbage logits; token 1's choice of expert 0 was dropped by capacity
    logits = [[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [900.0, -900.0, 5.0], [0.0, 0.0, 3.0]]
    routing = hand_routing(logits, kept=[(0, 0), (3, 2)], dropped=[(1, 0)], mask=[True, True, False, True])
    stats = RoutingStats.from_routing(routing)
    assert stats.chosen_counts.tolist() == [2, 0, 1] and stats.kept_counts.tolist() == [1, 0, 1]
    assert stats.chosen_counts.dtype == torch.int64 and int(stats.num_tokens) == 3
    real = torch.tensor(logits, dtype=F64)[[0, 1, 3]]
    probs = torch.softmax(real, -1)
    torch.testing.assert_close(stats.prob_sums, probs.sum(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(stats.z_sum, torch.logsumexp(real, -1).square().sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(stats.entropy_sum, -(probs * probs.log()).sum(), rtol=1e-14, atol=0)


def test_sigmoid_scores_are_normalised_like_deepseek_v3():
    router = TokenChoiceRouter(4, preset("deepseek_v3", 4, 2)).double()
    routing = router(torch.randn(5, 4, dtype=F64))
    s = torch.sigmoid(routing.logits)
    torch.testing.assert_close(routing_probabilities(routing), s / s.sum(-1, keepdim=True))


def test_raw_logit_scores_fall_back_to_softmax():
    router = TokenChoiceRouter(4, RouterSpec(num_experts=4, top_k=2, score_fn="none")).double()
    routing = router(torch.randn(5, 4, dtype=F64))
    torch.testing.assert_close(routing_probabilities(routing), torch.softmax(routing.logits, -1))


def test_sequence_index_rows_and_documents():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    index, count = sequence_index(mask)
    assert count == 2 and index.tolist() == [0, 0, 0, -1, -1, -1, -1, -1, 1, 1, -1, -1]
    docs = torch.tensor([[0, 0, 1, -1], [-1, -1, -1, -1], [0, 1, -1, -1]])
    index, count = sequence_index(mask, docs)
    assert count == 4 and index.tolist() == [0, 0, 1, -1, -1, -1, -1, -1, 2, 3, -1, -1]
    with pytest.raises(MoekitError, match="doc_ids"):
        sequence_index(mask, docs[:2])
    with pytest.raises(MoekitError, match="doc_ids"):
        sequence_index(mask, torch.where(mask, -1, 0))


def test_sequence_stats_split_the_batch_stats_by_document():
    router = TokenChoiceRouter(6, preset("qwen3_moe", 5, 2, capacity_factor=0.6)).double()
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    docs = torch.tensor([[0, 0, 1, 1, -1], [4, 4, 4, -1, -1]])
    routing = router(torch.randn(10, 6, dtype=F64), mask.reshape(-1))
    assert len(routing.dropped) > 0
    index, count = sequence_index(mask, docs)
    seq = SequenceStats.from_routing(routing, index, count)
    whole = RoutingStats.from_routing(routing)
    assert seq.num_tokens.tolist() == [2, 2, 3]
    assert torch.equal(seq.chosen_counts.sum(0), whole.chosen_counts)
    torch.testing.assert_close(seq.prob_sums.sum(0), whole.prob_sums)
    torch.testing.assert_close(seq.z_sums.sum(), whole.z_sum)
    torch.testing.assert_close(seq.entropy_sums.sum(), whole.entropy_sum)
    assert seq.chosen_counts.shape == (3, 5) and seq.chosen_counts.dtype == torch.int64


@given(
    num_tokens=st.integers(2, 30),
    num_experts=st.integers(2, 8),
    data=st.data(),
)
def test_stats_add_up_over_any_split(num_tokens, num_experts, data):
    """Stats of the whole batch = the sum of the stats of its parts, whatever the cut points."""
    k = data.draw(st.integers(1, num_experts))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    router = TokenChoiceRouter(6, RouterSpec(num_experts=num_experts, top_k=k)).double()
    x = torch.randn(num_tokens, 6, dtype=F64, generator=gen)
    mask = torch.rand(num_tokens, generator=gen) > 0.3
    cuts = sorted(data.draw(st.lists(st.integers(1, num_tokens - 1), max_size=3, unique=True)))
    whole = RoutingStats.from_routing(router(x, mask))
    parts = [
        RoutingStats.from_routing(router(x[a:b], mask[a:b]))
        for a, b in zip([0, *cuts], [*cuts, num_tokens], strict=True)
    ]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    assert torch.equal(total.chosen_counts, whole.chosen_counts) and torch.equal(
        total.num_tokens, whole.num_tokens
    )
    for a, b in [
        (total.prob_sums, whole.prob_sums),
        (total.z_sum, whole.z_sum),
        (total.entropy_sum, whole.entropy_sum),
    ]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_stats_all_reduced_without_a_group_is_the_local_sum():
    routing = hand_routing([[0.0, 1.0]], kept=[(0, 1)], dropped=[], mask=[True])
    stats = RoutingStats.from_routing(routing)
    reduced = stats.all_reduced(None)
    assert torch.equal(reduced.chosen_counts, stats.chosen_counts) and not reduced.prob_sums.requires_grad


# --- diagnostics --------------------------------------------------------------------------------


def test_diagnostics_hand_example():
    """Loads (4, 0, 2, 2) on 4 experts: mean 2, population std √2, CV √2/2, max/mean 2, one dead
    expert; 2 of 10 chosen assignments dropped; uniform scores give entropy ln 4."""
    kept = [(t, 0) for t in range(4)] + [(0, 2), (1, 2), (2, 3), (3, 3)]
    dropped = [(4, 0), (4, 2)]
    logits = [[0.0] * 4] * 5 + [[9.0, 0.0, 0.0, 0.0]]  # the last token is padding, with a peaked row
    routing = hand_routing(logits, kept, dropped, mask=[True] * 5 + [False])
    d = diagnose(routing)
    assert d.load_cv == pytest.approx(math.sqrt(2) / 2, rel=1e-14)
    assert d.max_over_mean_load == pytest.approx(2.0, rel=1e-14)
    assert d.dead_experts == 1
    assert d.drop_rate == pytest.approx(0.2, rel=1e-14)
    assert d.router_entropy == pytest.approx(math.log(4), rel=1e-14)
    assert d.num_tokens == 5
    assert set(d.to_dict()) == {
        "load_cv",
        "max_over_mean_load",
        "dead_experts",
        "router_entropy",
        "drop_rate",
        "num_tokens",
    }


def test_diagnostics_leave_null_experts_out_of_the_load():
    # experts 2 and 3 are null experts: their assignments are not load, and they are never "dead"
    kept = [(0, 0), (1, 1), (0, 2), (1, 2)]
    routing = hand_routing([[0.0] * 4] * 2, kept, [], mask=[True, True], num_compute_experts=2)
    d = diagnose(routing)
    assert d.load_cv == 0.0 and d.max_over_mean_load == 1.0 and d.dead_experts == 0


def test_diagnostic_functions_on_edge_cases():
    assert load_cv(torch.tensor([3, 3, 3])) == 0.0
    assert max_over_mean_load(torch.tensor([6, 0, 0])) == pytest.approx(3.0)
    assert math.isnan(load_cv(torch.zeros(3))) and math.isnan(max_over_mean_load(torch.zeros(3)))
    assert dead_experts(torch.tensor([0, 1, 0])) == 2
    assert drop_rate(torch.zeros(3), torch.zeros(3)) == 0.0
    empty = hand_routing([[0.0, 0.0]], [], [], mask=[False])
    assert math.isnan(diagnose(empty).router_entropy) and diagnose(empty).num_tokens == 0
