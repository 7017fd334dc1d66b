"""Routers whose number of experts per token varies: top-p (#9), null experts (#34), dynamic
capacity (#2) and the dense-to-sparse gate (#51), each held to the property that defines it."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moekit.errors import ConfigError
from moekit.layer import MoE, MoEConfig
from moekit.routing.dense_to_sparse import dts_temperature, set_dts_step
from moekit.routing.spec import RouterSpec
from moekit.routing.top_p import top_p_selection

HIDDEN, FF = 16, 8


def make_layer(kind, options, num_experts, top_k, shared=0, **spec):
    config = MoEConfig(
        hidden_size=HIDDEN,
        ff_size=FF,
        router=RouterSpec(num_experts=num_experts, top_k=top_k, **spec),
        router_kind=kind,
        router_options=options,
        num_shared_experts=shared,
        backend="loop",
    )
    return MoE(config)


def per_token_mass(routing):
    """Sum over each token's kept experts of its routing probability (routed and null alike)."""
    mass = torch.zeros(routing.num_tokens, dtype=routing.scores.dtype)
    kept = routing.kept
    return mass.index_add(0, kept.token, routing.scores[kept.token, kept.expert])


# ---- top-p (#9) --------------------------------------------------------------------------------


def test_top_p_reaches_p_with_the_fewest_experts():
    torch.manual_seed(1)
    layer = make_layer("top_p", {"p": 0.6}, 8, 8)
    x = torch.randn(300, HIDDEN) * 3
    _, routing = layer.forward_with_routing(x)
    probs = routing.scores
    mass = per_token_mass(routing)
    assert torch.all(mass >= 0.6 - 1e-6)
    # minimal: without its least probable chosen expert no token would reach p
    least = torch.full((routing.num_tokens,), float("inf")).scatter_reduce(
        0, routing.kept.token, probs[routing.kept.token, routing.kept.expert], reduce="amin"
    )
    assert torch.all(mass - least < 0.6)
    # and the chosen experts are the most probable ones
    counts = routing.experts_per_token()
    for t in range(routing.num_tokens):
        chosen = set(routing.kept.expert[routing.kept.token == t].tolist())
        assert chosen == set(probs[t].topk(int(counts[t])).indices.tolist())


def test_top_p_mean_experts_falls_with_p_and_sets_are_nested():
    torch.manual_seed(2)
    layer = make_layer("top_p", {"p": 0.9}, 8, 8)
    x = torch.randn(400, HIDDEN) * 2
    means, previous = [], None
    for p in (0.95, 0.8, 0.6, 0.4, 0.2):
        layer.router.options = type(layer.router.options)(p=p)
        _, routing = layer.forward_with_routing(x)
        counts = routing.experts_per_token()
        if previous is not None:
            assert torch.all(counts <= previous)
        previous = counts
        means.append(counts.float().mean().item())
    assert all(a > b for a, b in zip(means, means[1:], strict=False))
    assert means[-1] >= 1.0


def test_top_p_cap_and_raw_or_renormalised_weights():
    probs = torch.softmax(torch.randn(50, 8), dim=-1)
    capped = top_p_selection(probs, 0.99, max_experts=3)
    assert int(capped.sum(-1).max()) <= 3 and int(capped.sum(-1).min()) >= 1
    torch.manual_seed(3)
    raw = make_layer("top_p", {"p": 0.5}, 6, 6)
    x = torch.randn(40, HIDDEN)
    _, routing = raw.forward_with_routing(x)
    kept = routing.kept
    torch.testing.assert_close(kept.weight, routing.scores[kept.token, kept.expert])  # #9: raw probs
    norm = make_layer("top_p", {"p": 0.5}, 6, 6, renorm="sum")
    norm.load_state_dict(raw.state_dict())
    _, routing = norm.forward_with_routing(x)
    sums = torch.zeros(40).index_add(0, routing.kept.token, routing.kept.weight)
    torch.testing.assert_close(sums, torch.ones(40))


# ---- null experts (#34) --------------------------------------------------------------------------


def test_null_experts_vary_real_experts_per_token_over_0_to_k():
    torch.manual_seed(4)
    layer = make_layer("null_experts", {"num_null": 4}, 4, 4, renorm="sum")
    with torch.no_grad():
        layer.router.linear.weight.mul_(4)
    x = torch.randn(3000, HIDDEN)
    _, routing = layer.forward_with_routing(x)
    assert routing.num_experts == 8 and routing.num_compute_experts == 4
    total = routing.experts_per_token(compute_only=False)
    real = routing.experts_per_token()
    assert torch.all(total == 4)  # top-k' over real + null
    assert set(real.tolist()) == set(range(5))  # every count of real experts in [0, k'] occurs
    assert real.float().mean() < 4
    # weights: renormalised over the chosen real experts; null assignments weigh nothing
    null = routing.kept.expert >= 4
    assert torch.all(routing.kept.weight[null] == 0)
    has_real = real > 0
    sums = torch.zeros(3000).index_add(0, routing.kept.token, routing.kept.weight)
    torch.testing.assert_close(sums[has_real], torch.ones(int(has_real.sum())))


def _onednn_linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
    """torch's flop counter knows torch.mm, not oneDNN's linear (moekit.kernels.gemm may use it)."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]


ONEDNN_FLOPS = {torch.ops.mkldnn._linear_pointwise: _onednn_linear_flops}


def test_null_experts_cost_no_flops(monkeypatch):
    """The layer does exactly the GEMM work of its router and of its real assignments. Counted on
    the portable path: FlopCounterMode cannot see inside moekit's C++ expert loops."""
    monkeypatch.setenv("MOEKIT_NATIVE", "0")
    torch.manual_seed(5)
    layer = make_layer("null_experts", {"num_null": 6}, 4, 4, renorm="sum")
    x = torch.randn(60, HIDDEN)
    layer(x)  # the GEMM kernel probe (moekit.kernels.gemm) runs once per process: not in the count
    with FlopCounterMode(display=False, custom_mapping=ONEDNN_FLOPS) as counter:
        _, routing = layer.forward_with_routing(x)
    real = len(routing.compute_assignments)
    assert real < len(routing.kept)  # some assignments went to null experts
    router_flops = 2 * 60 * HIDDEN * 10
    rows = real  # the portable path: one torch.mm per expert over its own rows
    expert_flops = 2 * rows * (HIDDEN * 2 * FF + FF * HIDDEN)  # SwiGLU: [gate | up], then down
    assert counter.get_total_flops() == router_flops + expert_flops


# ---- dynamic capacity (#2) -----------------------------------------------------------------------


def test_dynamic_capacity_lets_tokens_run_on_shared_experts_alone():
    torch.manual_seed(6)
    layer = make_layer("dynamic_capacity", {"p": 0.7, "num_null": 2}, 6, 6, shared=1, renorm="sum")
    with torch.no_grad():  # tokens with x[0] > 0 put nearly all their mass on null expert 6
        layer.router.linear.weight[6, 0] = 40.0
    x = torch.randn(200, HIDDEN)
    y, routing = layer.forward_with_routing(x)
    routed = routing.experts_per_token()
    null_only = x[:, 0] > 0.5
    assert torch.all(routed[null_only] == 0) and torch.all(routed[x[:, 0] < 0] >= 1)
    torch.testing.assert_close(y[null_only], layer.shared(x[null_only]))
    # |I| <= ceil(p (N_r + N_n)): the widest set a flat distribution needs
    assert int(routing.experts_per_token(compute_only=False).max()) <= math.ceil(0.7 * 8)
    assert torch.all(per_token_mass(routing) >= 0.7 - 1e-6)


def test_dynamic_capacity_requires_shared_experts():
    with pytest.raises(ConfigError, match=r"moe\.num_shared_experts"):
        make_layer("dynamic_capacity", {"p": 0.7}, 4, 4, shared=0)


# ---- dense-to-sparse gate (#51) ------------------------------------------------------------------


def test_dts_schedule_anneals_from_max_to_min():
    for schedule in ("exponential", "linear"):
        taus = [dts_temperature(t, 2.0, 0.1, 100, schedule) for t in range(0, 150, 10)]
        assert taus[0] == pytest.approx(2.0) and taus[-1] == pytest.approx(0.1)
        assert all(a > b for a, b in zip(taus[:10], taus[1:11], strict=True))
        assert taus[10:] == [pytest.approx(0.1)] * 5


def test_dts_mean_selected_experts_falls_from_dense_to_one_as_temperature_anneals():
    torch.manual_seed(7)
    options = {"temperature_max": 8.0, "temperature_min": 0.005, "decay_steps": 100}
    layer = make_layer("dense_to_sparse", options, 8, 1).train()
    x = torch.randn(2000, HIDDEN)
    means = []
    for step in range(0, 101, 10):
        assert set_dts_step(layer, step) == 1
        generator = torch.Generator().manual_seed(0)  # the same Gumbel noise at every temperature
        routing = layer.router(x, generator=generator)
        means.append(routing.experts_per_token().float().mean().item())
    assert means[0] > 7.5  # nearly dense
    assert means[-1] < 1.1  # nearly top-1
    assert all(a >= b for a, b in zip(means, means[1:], strict=False))


def test_dts_hard_phase_takes_exactly_top_k():
    layer = make_layer("dense_to_sparse", {"hard_after": 5}, 8, 2).train()
    x = torch.randn(100, HIDDEN)
    layer.router.set_step(4, 10)
    assert layer.router(x).experts_per_token().float().mean() > 2
    layer.router.set_step(5, 10)
    assert torch.all(layer.router(x).experts_per_token() == 2)
