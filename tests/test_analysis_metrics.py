"""Routing-health metrics on synthetic traces whose answers are known by construction."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.analysis import metrics as m
from moekit.analysis.super_experts import find_super_experts


def test_nmi_is_one_when_every_expert_serves_a_single_domain():
    generator = torch.Generator().manual_seed(1)
    domains = torch.randint(0, 4, (5000,), generator=generator)
    experts = 2 * domains + torch.randint(
        0, 2, (5000,), generator=generator
    )  # two private experts per domain
    assert m.normalized_mutual_information(experts, domains) == pytest.approx(1.0, abs=1e-12)
    # the symmetric normalisation is below 1: the expert carries one more bit than the domain
    assert m.normalized_mutual_information(experts, domains, "sqrt") < 0.9


def test_nmi_is_near_zero_when_routing_ignores_the_domain():
    generator = torch.Generator().manual_seed(2)
    domains = torch.randint(0, 5, (200_000,), generator=generator)
    experts = torch.randint(0, 8, (200_000,), generator=generator)
    assert m.normalized_mutual_information(experts, domains) < 1e-3


def test_nmi_of_a_relabelling_is_one_and_unknown_labels_are_ignored():
    a = torch.randint(0, 6, (1000,))
    b = (a * 5 + 1) % 6  # a bijection of the labels
    for normalization in m.NMI_NORMALIZATIONS:
        assert m.normalized_mutual_information(a, b, normalization) == pytest.approx(1.0)
    noisy_b = b.clone()
    noisy_b[::3] = -1  # unknown domain: left out, so the answer is unchanged
    assert m.normalized_mutual_information(a, noisy_b) == pytest.approx(1.0)
    assert math.isnan(m.normalized_mutual_information(a, torch.zeros_like(a)))  # H(domain) = 0
    with pytest.raises(ValueError, match="normalization"):
        m.normalized_mutual_information(a, b, "geometric")


def test_mutual_information_of_two_independent_fair_bits_and_of_a_copy():
    joint_independent = torch.tensor([[25, 25], [25, 25]])
    joint_copy = torch.tensor([[50, 0], [0, 50]])
    assert m.mutual_information(joint_independent) == pytest.approx(0.0, abs=1e-12)
    assert m.mutual_information(joint_copy) == pytest.approx(math.log(2))


def test_load_statistics():
    uniform = torch.full((8,), 10)
    assert m.coefficient_of_variation(uniform) == 0.0
    assert m.max_violation(uniform) == 0.0
    one_hot = torch.tensor([40, 0, 0, 0, 0])
    # all the load on one of E experts: CV = sqrt(E - 1), MaxVio = E - 1
    assert m.coefficient_of_variation(one_hot) == pytest.approx(2.0)
    assert m.max_violation(one_hot) == pytest.approx(4.0)
    assert m.dead_experts(one_hot) == [1, 2, 3, 4]
    assert m.dead_experts(uniform) == []
    load = torch.tensor([10, 10, 10, 31, 9])  # mean 14: 31 > 2 x 14 only for expert 3
    assert m.overloaded_experts(load, factor=2.0) == [3]
    assert m.overloaded_experts(load, factor=3.0) == []
    assert math.isnan(m.coefficient_of_variation(torch.zeros(4)))


def test_experts_per_token_histogram_for_a_variable_k_router():
    experts = torch.tensor([[3, 1, 2], [4, -1, -1], [-1, -1, -1], [0, 5, -1]])
    assert m.experts_per_token_histogram(experts) == [1, 1, 1, 1]
    # experts 4 and 5 are null experts (AdaMoE): they cost nothing and are not counted
    assert m.experts_per_token_histogram(experts, num_compute_experts=4) == [2, 1, 0, 1]


def test_entropy_and_margin():
    uniform = torch.full((3, 8), 1 / 8)
    assert torch.allclose(m.token_entropy(uniform), torch.full((3,), math.log(8)))
    one_hot = torch.eye(4)
    assert torch.allclose(m.token_entropy(one_hot), torch.zeros(4))
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    chosen = torch.tensor([[0, 1], [3, -1], [0, 1]])
    margin = m.topk_margin(p, chosen)
    assert margin[0] == pytest.approx(0.3 - 0.15)
    assert margin[1] == pytest.approx(0.4 - 0.3)
    assert margin[2] == pytest.approx(0.0)
    # a bias that overrides the scores shows as a negative margin; all or no experts: undefined
    assert m.topk_margin(p[:1], torch.tensor([[2, 3]]))[0] == pytest.approx(0.05 - 0.5)
    assert torch.isnan(m.topk_margin(p[:1], torch.tensor([[0, 1, 2, 3]]))).all()
    assert torch.isnan(m.topk_margin(p[:1], torch.tensor([[-1, -1]]))).all()


def test_drop_rate_rises_where_drops_were_planted():
    positions = torch.arange(16).repeat(10)
    chosen = torch.ones(160, 2, dtype=torch.bool)
    dropped = torch.zeros(160, 2, dtype=torch.bool)
    dropped[positions >= 12, 1] = True  # the second choice of every token after position 11
    starts, rates, counts = m.drop_rate_by_position(dropped, chosen, positions, bin_width=4)
    assert starts == [0, 4, 8, 12]
    assert rates == [0.0, 0.0, 0.0, 0.5]
    assert counts == [80, 80, 80, 80]


def test_top_expert_share():
    counts = torch.tensor([[10, 0, 0, 0], [4, 3, 2, 1], [0, 0, 0, 0]])
    top1 = m.top_expert_share(counts, 1)
    top2 = m.top_expert_share(counts, 2)
    assert top1[0] == 1.0 and top1[1] == pytest.approx(0.4) and torch.isnan(top1[2])
    assert top2[1] == pytest.approx(0.7)


def test_token_id_purity_when_routing_follows_token_ids_and_when_it_does_not():
    generator = torch.Generator().manual_seed(3)
    token_ids = torch.randint(0, 50, (20_000,), generator=generator)
    by_id = token_ids % 8
    purity, coverage = m.label_purity(by_id, token_ids, min_count=2)
    assert purity == 1.0 and coverage == 1.0
    random_experts = torch.randint(0, 8, (20_000,), generator=generator)
    purity, _ = m.label_purity(random_experts, token_ids, min_count=2)
    assert purity < 0.2  # ~400 tokens per id: the majority expert is barely above 1/8


def test_purity_ignores_rare_labels_below_min_count():
    experts = torch.tensor([0, 0, 1, 2, 3])
    labels = torch.tensor([7, 7, 7, 8, 9])  # ids 8 and 9 are seen once
    assert m.label_purity(experts, labels, min_count=1) == (pytest.approx(4 / 5), 1.0)
    assert m.label_purity(experts, labels, min_count=2) == (pytest.approx(2 / 3), pytest.approx(3 / 5))
    assert math.isnan(m.label_purity(experts, labels, min_count=4)[0])


def test_coactivation_of_a_layer_that_copies_its_predecessor_up_to_relabelling():
    generator = torch.Generator().manual_seed(4)
    top1 = torch.randint(0, 6, (3000, 1), generator=generator)
    permuted = (top1 * 5 + 2) % 6
    counts = m.coactivation_counts(top1, permuted, 6, 6)
    assert int(counts.sum()) == 3000
    assert m.top_partner_rate(counts, torch.bincount(top1.flatten(), minlength=6)) == pytest.approx(1.0)
    independent = torch.randint(0, 6, (3000, 1), generator=generator)
    counts = m.coactivation_counts(top1, independent, 6, 6)
    assert m.top_partner_rate(counts, torch.bincount(top1.flatten(), minlength=6)) < 0.3


def test_drift_metrics_between_identical_and_shifted_routings():
    generator = torch.Generator().manual_seed(5)
    token_ids = torch.randint(0, 30, (2000,), generator=generator)
    experts = torch.stack([token_ids % 8, (token_ids + 3) % 8], dim=1)
    assert m.top1_agreement(experts[:, 0], experts[:, 0]) == 1.0
    assert m.topk_jaccard(experts, experts, 8) == 1.0
    assert m.token_map_agreement(experts[:, 0], experts[:, 0], token_ids) == (1.0, 1.0)
    shifted = (experts + 1) % 8
    assert m.top1_agreement(experts[:, 0], shifted[:, 0]) == 0.0
    assert m.token_map_agreement(experts[:, 0], shifted[:, 0], token_ids) == (0.0, 0.0)
    # {a, a+3} vs {a+1, a+4}: disjoint sets
    assert m.topk_jaccard(experts, shifted, 8) == 0.0
    half = torch.stack([experts[:, 0], (experts[:, 1] + 1) % 8], dim=1)  # one of two kept: 1/3
    assert m.topk_jaccard(experts, half, 8) == pytest.approx(1 / 3)


def test_js_divergence_bounds():
    assert m.js_divergence(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == pytest.approx(0.0)
    assert m.js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(math.log(2))


def srp_by_definition(active: torch.Tensor, runs: torch.Tensor, length: int) -> float:
    """The SRP of #52 spelled out: every window, every expert, every threshold."""
    windows = [
        active[s : s + length].sum(0)
        for s in range(active.shape[0] - length + 1)
        if runs[s] == runs[s + length - 1]
    ]
    counts = [int(c) for window in windows for c in window]
    actual = sum(counts)
    best = 0.0
    for t in range(length + 1):
        predicted = [c for c in counts if c >= t]
        matches, predictions = sum(predicted), length * len(predicted)
        best = max(best, 2 * matches / (predictions + actual))
    return best


@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=40),
    st.integers(1, 6),
)
def test_srp_matches_its_definition(rows, length):
    """Variable k (a repeated second choice becomes 'no expert'), several runs."""
    experts = torch.tensor([[a, b if b != a else -1] for a, b, _ in rows])
    runs = torch.tensor(sorted(run for _, _, run in rows))
    active = m.multi_hot(experts, 5)
    histogram = m.window_count_histogram(active, runs, length)
    if int(histogram.sum()) == 0:  # no window fits in a run
        assert all(runs[s] != runs[s + length - 1] for s in range(len(rows) - length + 1))
        return
    srp, _ = m.segment_routing_performance(histogram, length)
    assert srp == pytest.approx(srp_by_definition(active.long(), runs, length))


def test_srp_is_one_for_routing_constant_within_runs_and_two_thirds_for_alternation():
    runs = torch.arange(12).repeat_interleave(16)
    constant = torch.stack([runs % 5, (runs + 2) % 5], dim=1)
    histogram = m.window_count_histogram(m.multi_hot(constant, 5), runs, 8)
    assert m.segment_routing_performance(histogram, 8)[0] == pytest.approx(1.0)
    alternating = (torch.arange(64) % 2).unsqueeze(1)
    histogram = m.window_count_histogram(m.multi_hot(alternating, 2), torch.zeros(64, dtype=torch.long), 2)
    # every window activates each expert once: the best segment router predicts both, F1 = 2/3
    assert m.segment_routing_performance(histogram, 2)[0] == pytest.approx(2 / 3)


def test_super_experts_are_the_planted_outliers():
    generator = torch.Generator().manual_seed(6)
    layers = [1.0 + 0.1 * torch.rand(64, generator=generator) for _ in range(16)]  # 1024 (layer, expert)
    layers[3][17] = 250.0
    layers[9][2] = 180.0
    layers[12][40] = 12.0  # above P99.5 but below a tenth of the largest: not super
    assert find_super_experts(layers) == [(3, 17), (9, 2)]
    layers[5][0] = float("nan")  # an expert that never ran is ignored
    assert find_super_experts(layers) == [(3, 17), (9, 2)]
