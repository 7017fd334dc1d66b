"""The balancing formulas against hand-computed examples and independent references, plus their
coefficient schedules and config validation."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.balance import BalanceConfig, ObjectiveSpec, RoutingStats, Schedule, SequenceStats, sequence_index
from moekit.balance.objectives import (
    deepseek_sequence_aux_loss,
    global_batch_load_balancing_loss,
    router_z_loss,
    router_z_per_token,
    routing_entropy_loss,
    routing_entropy_per_token,
    slot_fractions,
    switch_load_balancing_loss,
)
from moekit.errors import ConfigError
from moekit.routing.spec import preset
from moekit.routing.token_choice import TokenChoiceRouter

F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def counts(values):
    return torch.tensor(values, dtype=torch.int64)


# --- Switch / GShard ----------------------------------------------------------------------------


def test_switch_lbl_hand_example():
    # 4 tokens, top-1, 2 experts: f = (3/4, 1/4), P = (2.5/4, 1.5/4); L = 2 (0.75·0.625 + 0.25·0.375)
    loss = switch_load_balancing_loss(counts([3, 1]), t([2.5, 1.5]), 4)
    assert float(loss) == pytest.approx(1.125, rel=1e-15)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_switch_lbl_is_one_when_uniform_and_e_when_collapsed(k):
    num_experts, num_tokens = 4, 8
    uniform = switch_load_balancing_loss(
        counts([num_tokens * k // num_experts] * num_experts),
        t([num_tokens / num_experts] * num_experts),
        num_tokens,
    )
    assert float(uniform) == pytest.approx(1.0, rel=1e-15)
    collapsed = switch_load_balancing_loss(
        counts([num_tokens * k, 0, 0, 0]), t([num_tokens, 0, 0, 0]), num_tokens
    )
    assert float(collapsed) == pytest.approx(num_experts, rel=1e-15)


def test_switch_lbl_gradient_flows_through_probabilities_only():
    prob_sums = t([2.5, 1.5]).requires_grad_()
    switch_load_balancing_loss(counts([3, 1]), prob_sums, 4).backward()
    # dL/dS_i = E f_i / T
    torch.testing.assert_close(prob_sums.grad, t([2 * 0.75 / 4, 2 * 0.25 / 4]), rtol=1e-15, atol=0)


def test_switch_lbl_matches_hf_mixtral_up_to_its_factor_k():
    """HF's load_balancing_loss_func divides the counts by T, not T·k: k times our value."""
    hf = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    num_experts, k, batch, seq = 8, 2, 3, 5
    router = TokenChoiceRouter(16, preset("mixtral", num_experts, k)).double()
    x = torch.randn(batch * seq, 16, dtype=F64)
    attention_mask = torch.rand(batch, seq) > 0.3
    routing = router(x, attention_mask.reshape(-1))
    stats = RoutingStats.from_routing(routing)
    ours = switch_load_balancing_loss(stats.chosen_counts, stats.prob_sums, int(stats.num_tokens))
    theirs = hf.load_balancing_loss_func((routing.logits,), num_experts, k, attention_mask.long())
    torch.testing.assert_close(k * ours, theirs.to(F64), rtol=1e-6, atol=0)  # HF accumulates in fp32


def test_null_experts_share_their_mean_fraction():
    """AdaMoE's null-aware LBL: the f of null experts (ids >= 2 here) is replaced by their mean."""
    f = slot_fractions(counts([4, 2, 1, 3]), F64, num_compute_experts=2)
    torch.testing.assert_close(f, t([0.4, 0.2, 0.2, 0.2]), rtol=1e-15, atol=0)
    loss = switch_load_balancing_loss(counts([4, 2, 1, 3]), t([1.0, 2.0, 3.0, 4.0]), 5, num_compute_experts=2)
    assert float(loss) == pytest.approx(4 * (0.4 * 1 + 0.2 * 2 + 0.2 * 3 + 0.2 * 4) / 5, rel=1e-15)


def test_empty_batch_gives_zero_not_nan():
    assert float(switch_load_balancing_loss(counts([0, 0]), t([0.0, 0.0]), 0)) == 0.0
    assert float(router_z_loss(t(0.0), 0)) == 0.0
    assert float(routing_entropy_loss(t(0.0), 0)) == 0.0


# --- DeepSeek-V3 sequence-wise loss -------------------------------------------------------------


def test_deepseek_sequence_aux_hand_example():
    # N_r = 2, K_r = 1. Sequence A: 2 tokens both on expert 0, s' = (.8,.2), (.6,.4):
    #   f = 2/(1·2)·(2, 0) = (2, 0), P = (.7, .3), Σ f P = 1.4.
    # Sequence B: 1 token on expert 1, s' = (.1, .9): f = (0, 2), P = (.1, .9), Σ f P = 1.8.
    seq_counts = counts([[2, 0], [0, 1]])
    seq_sums = t([[1.4, 0.6], [0.1, 0.9]])
    tokens = counts([2, 1])
    assert float(deepseek_sequence_aux_loss(seq_counts, seq_sums, tokens, 2)) == pytest.approx(1.6, rel=1e-15)
    # the global batch has 4 sequences: this micro-batch's share is the sum over its 2 divided by 4
    assert float(deepseek_sequence_aux_loss(seq_counts, seq_sums, tokens, 4)) == pytest.approx(0.8, rel=1e-15)


def test_deepseek_sequence_aux_matches_the_paper_formula_written_out():
    """Sigmoid router, packed rows: our statistics + formula against DeepSeek-V3 eq. 17-20 in loops."""
    num_experts, k = 6, 2
    router = TokenChoiceRouter(8, preset("deepseek_v3", num_experts, k)).double()
    with torch.no_grad():
        router.selection_bias.normal_(0, 0.5)  # biases selection, never P
    token_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, -1, -1, -1]])
    x = torch.randn(12, 8, dtype=F64)
    routing = router(x, token_mask.reshape(-1))
    index, num_sequences = sequence_index(token_mask, doc_ids)
    seq = SequenceStats.from_routing(routing, index, num_sequences)
    ours = deepseek_sequence_aux_loss(seq.chosen_counts, seq.prob_sums, seq.num_tokens, num_sequences)

    chosen = [set() for _ in range(12)]
    for tok, exp in zip(routing.kept.token.tolist(), routing.kept.expert.tolist(), strict=True):
        chosen[tok].add(exp)
    s = torch.sigmoid(routing.logits.detach())
    expected = 0.0
    for tokens in ([0, 1], [2, 3, 4], [6, 7, 8]):
        num_tokens = len(tokens)
        for i in range(num_experts):
            f_i = num_experts / (k * num_tokens) * sum(i in chosen[tok] for tok in tokens)
            p_i = sum(float(s[tok, i] / s[tok].sum()) for tok in tokens) / num_tokens
            expected += f_i * p_i
    assert float(ours.detach()) == pytest.approx(expected / 3, rel=1e-12)


# --- global-batch LBL ---------------------------------------------------------------------------


def test_global_batch_lbl_does_not_punish_single_domain_micro_batches():
    """ "Demons in the Detail": micro-batch A sends both tokens to expert 0 with P = (.9, .1), B both
    to expert 1 with P = (.1, .9). Per micro-batch each loss is 2·0.9 = 1.8; over the global batch
    f = P = (.5, .5) and the loss is 1, the balanced minimum."""
    a_counts, a_sums = counts([2, 0]), t([1.8, 0.2])
    b_counts, b_sums = counts([0, 2]), t([0.2, 1.8])
    micro = (
        switch_load_balancing_loss(a_counts, a_sums, 2) + switch_load_balancing_loss(b_counts, b_sums, 2)
    ) / 2
    assert float(micro) == pytest.approx(1.8, rel=1e-15)
    global_counts = a_counts + b_counts
    shares = [global_batch_load_balancing_loss(global_counts, sums, 4) for sums in (a_sums, b_sums)]
    assert float(sum(shares)) == pytest.approx(1.0, rel=1e-15)
    whole = switch_load_balancing_loss(global_counts, a_sums + b_sums, 4)
    assert float(sum(shares)) == pytest.approx(float(whole), rel=1e-15)


# --- z-loss and entropy -------------------------------------------------------------------------


def test_router_z_loss_hand_example():
    # logsumexp(0, 0) = ln 2; logsumexp(ln 3, 0) = ln 4 = 2 ln 2; mean of squares = 2.5 (ln 2)²
    z = router_z_per_token(t([[0.0, 0.0], [math.log(3), 0.0]]))
    assert float(router_z_loss(z.sum(), 2)) == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-15)


def test_routing_entropy_hand_example():
    h = routing_entropy_per_token(t([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25] * 4]))
    torch.testing.assert_close(h, t([math.log(2), 0.0, math.log(4)]), rtol=1e-15, atol=0)
    assert float(routing_entropy_loss(h.sum(), 3)) == pytest.approx(math.log(8) / 3, rel=1e-15)


def test_token_means_are_element_wise_for_sequences():
    sums, tokens = t([3.0, 8.0]), counts([3, 4])
    torch.testing.assert_close(router_z_loss(sums, tokens), t([1.0, 2.0]))
    torch.testing.assert_close(routing_entropy_loss(sums, tokens), t([1.0, 2.0]))


# --- schedules ----------------------------------------------------------------------------------


def test_schedules():
    constant = Schedule.from_value(0.01)
    assert [constant.value(s) for s in (0, 7, 10**6)] == [0.01] * 3
    linear = Schedule.from_value({"kind": "linear", "start": 0.1, "end": 0.0, "steps": 10})
    assert [linear.value(s) for s in (0, 5, 10, 50)] == pytest.approx([0.1, 0.05, 0.0, 0.0])
    assert Schedule.linear(0.0, 1.0, 4).value(1) == pytest.approx(0.25)
    assert Schedule.from_value(0).always_zero and not linear.always_zero
    assert not Schedule.linear(0.0, 0.5, 3).always_zero
    assert (
        Schedule.from_value(linear.to_dict()) == linear
        and Schedule.from_value(constant.to_dict()) == constant
    )


@pytest.mark.parametrize(
    "value, field",
    [
        (-0.1, "x"),
        (float("nan"), "x"),
        (float("inf"), "x"),
        ("0.1", "x"),
        ({"kind": "cosine", "start": 1.0}, "x.kind"),
        ({"kind": "linear", "start": 1.0, "end": 0.0}, "x.steps"),
        ({"kind": "linear", "start": 1.0, "steps": 5}, "x.end"),
        ({"kind": "linear", "start": 1.0, "end": -1.0, "steps": 5}, "x.end"),
        ({"start": 1.0, "stop": 2}, "x.stop"),
        ({"end": 1.0}, "x.start"),
    ],
)
def test_schedule_errors_name_the_field(value, field):
    with pytest.raises(ConfigError) as err:
        Schedule.from_value(value, "x")
    assert err.value.field == field


# --- config -------------------------------------------------------------------------------------


def test_config_round_trip_and_coefficients():
    data = {
        "objectives": [
            {"kind": "load_balance", "scope": "global", "coefficient": 0.01},
            {
                "kind": "z_loss",
                "scope": "micro_batch",
                "coefficient": {"kind": "linear", "start": 1e-3, "end": 0.0, "steps": 4},
            },
            {"kind": "load_balance", "scope": "sequence", "coefficient": 1e-4},
        ],
        "bias_update_rate": 0.001,
    }
    config = BalanceConfig.from_dict(data)
    assert BalanceConfig.from_dict(config.to_dict()) == config
    assert config.coefficients(2) == pytest.approx(
        {"load_balance/global": 0.01, "z_loss/micro_batch": 5e-4, "load_balance/sequence": 1e-4}
    )
    assert BalanceConfig.from_dict(None) == BalanceConfig()
    assert ObjectiveSpec.from_dict({"kind": "entropy", "coefficient": 0.1}, "o").scope == "global"


@pytest.mark.parametrize(
    "data, field",
    [
        ({"objective": []}, "balance.objective"),
        ({"objectives": {"kind": "z_loss"}}, "balance.objectives"),
        ({"objectives": [{"kind": "aux", "coefficient": 1}]}, "balance.objectives[0].kind"),
        (
            {"objectives": [{"kind": "z_loss", "scope": "batch", "coefficient": 1}]},
            "balance.objectives[0].scope",
        ),
        ({"objectives": [{"kind": "z_loss"}]}, "balance.objectives[0].coefficient"),
        ({"objectives": [{"kind": "z_loss", "coefficient": -1}]}, "balance.objectives[0].coefficient"),
        ({"objectives": [{"kind": "z_loss", "coefficient": 1, "alpha": 2}]}, "balance.objectives[0].alpha"),
        (
            {"objectives": [{"kind": "z_loss", "coefficient": 1}, {"kind": "z_loss", "coefficient": 2}]},
            "balance.objectives[1]",
        ),
        ({"bias_update_rate": -0.001}, "balance.bias_update_rate"),
        ({"objectives": ["z_loss"]}, "balance.objectives[0]"),
    ],
)
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        BalanceConfig.from_dict(data)
    assert err.value.field == field
