"""Routing overrides: no-op when empty, re-selection reproduces every family's router, forced and
masked experts, k (0 = skip) and top-p, replacement weights, positions, gradients and capture."""

import pytest
import torch

from helpers import tiny_models
from moekit.addressing import moe_layers
from moekit.errors import MoekitError
from moekit.inference.generate import generate
from moekit.layer import MoE, MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.override import (
    Overrides,
    RoutingCapture,
    RoutingOverride,
    dense_routing,
    override_routing,
)
from moekit.routing.spec import RouterSpec, preset

transformers = pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
from moekit.interop.tiny import TINY_CONFIGS  # noqa: E402


def tiny_lm(seed=0, router="qwen3_moe", shared=0, router_kind="token_choice", **options):
    torch.manual_seed(seed)
    moe = MoEConfig(
        hidden_size=32,
        ff_size=16,
        router=RouterSpec(num_experts=8, top_k=2) if router is None else preset(router, 8, 2),
        num_shared_experts=shared,
        router_kind=router_kind,
        **options,
    )
    config = LMConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ff_size=48, max_seq_len=32, moe=moe
    )
    return LanguageModel(config).eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_models(tmp_path_factory)


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def chosen_sets(routing):
    selected, _ = dense_routing(routing)
    return selected


def test_empty_override_and_capture_are_bit_identical():
    model = tiny_lm()
    with torch.no_grad():
        plain = model(IDS)
        capture = RoutingCapture()
        with override_routing(model, Overrides(default=RoutingOverride(), capture=capture)):
            same = model(IDS)
    assert torch.equal(plain.logits, same.logits)
    assert len(capture.routings) == 2 and all(len(v) == 1 for v in capture.routings.values())
    for index, routing in enumerate(plain.routings):
        assert torch.equal(capture.routings[index][0].kept.expert, routing.kept.expert)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_reselection_reproduces_each_familys_router(family, name):
    """A non-empty override that changes nothing (zero bias, the router's own k) re-selects with the
    router's own rule: the same experts, weights and logits as the router."""
    model = family(name)
    ids = IDS % model.config.vocab_size
    spec_k = model.moe_layers[0].config.router.top_k
    zero = torch.zeros(model.moe_layers[0].config.router.num_experts)
    with torch.no_grad():
        plain = model(ids)
        with override_routing(model, RoutingOverride(logit_bias=zero, top_k=spec_k)):
            redone = model(ids)
    for a, b in zip(plain.routings, redone.routings, strict=True):
        sel_a, w_a = dense_routing(a)
        sel_b, w_b = dense_routing(b)
        assert torch.equal(sel_a, sel_b)
        torch.testing.assert_close(w_a, w_b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plain.logits, redone.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["lm", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_forced_expert_always_chosen_and_masked_never(family, name):
    model = tiny_lm() if name == "lm" else family(name)
    ids = IDS % (64 if name == "lm" else model.config.vocab_size)
    with torch.no_grad():
        plain = model(ids)
        with override_routing(model, RoutingOverride(force=[3], mask=[0, 1])):
            out = model(ids)
    for routing in out.routings:
        selected = chosen_sets(routing)
        assert bool(selected[:, 3].all())
        assert not bool(selected[:, :2].any())
        assert bool((selected.sum(-1) == model.moe_layers[0].config.router.top_k).all())
    assert not torch.equal(plain.logits, out.logits)


def test_gradients_reach_a_logit_bias():
    model = tiny_lm(seed=1).double()
    bias = torch.zeros(2, 8, dtype=torch.float64, requires_grad=True)
    overrides = {0: RoutingOverride(logit_bias=bias[0]), 1: RoutingOverride(logit_bias=bias[1])}
    with override_routing(model, overrides):
        loss = torch.nn.functional.cross_entropy(
            model(IDS).logits[:, :-1].reshape(-1, 64), IDS[:, 1:].reshape(-1)
        )
    loss.backward()
    assert bias.grad is not None and bool(bias.grad.isfinite().all())
    assert float(bias.grad[0].abs().sum()) > 0 and float(bias.grad[1].abs().sum()) > 0
    # and a step along the gradient lowers the loss (the bias acts on the model's output)
    step = -1e-3 * bias.grad / bias.grad.norm()
    with torch.no_grad(), override_routing(model, {0: RoutingOverride(logit_bias=step[0])}):
        lower = torch.nn.functional.cross_entropy(
            model(IDS).logits[:, :-1].reshape(-1, 64), IDS[:, 1:].reshape(-1)
        )
    assert float(lower) < float(loss.detach())


def test_k_zero_skips_the_routed_experts_and_k_one_uses_one():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(hidden_size=16, ff_size=8, router=preset("qwen2_moe", 6, 2), num_shared_experts=1))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y, routing = layer.forward_with_routing(x, override=RoutingOverride(top_k=0))
        assert len(routing.kept) == 0
        torch.testing.assert_close(y, layer.shared(x.reshape(-1, 16)).reshape(x.shape))
        _, one = layer.forward_with_routing(x, override=RoutingOverride(top_k=1))
        assert bool((one.experts_per_token() == 1).all())
        _, four = layer.forward_with_routing(x, override=RoutingOverride(top_k=4))
        assert bool((four.experts_per_token() == 4).all())
        # more than the layer's 6 experts would be clamped to 6: refused instead
        with pytest.raises(MoekitError, match="override.top_k: got 7, the layer has 6 experts"):
            layer.forward_with_routing(x, override=RoutingOverride(top_k=7))
        with pytest.raises(MoekitError, match="override.skipped_top_k: got 7, the layer has 6 experts"):
            layer.forward_with_routing(x, override=RoutingOverride(skip_fraction=0.5, skipped_top_k=7))


def test_top_p_override_reaches_the_mass():
    torch.manual_seed(1)
    layer = MoE(MoEConfig(hidden_size=16, ff_size=8, router=preset("mixtral", 8, 2)))
    x = torch.randn(40, 16)
    with torch.no_grad():
        _, routing = layer.forward_with_routing(x, override=RoutingOverride(top_p=0.6, top_k=8))
    probs = torch.softmax(routing.logits, -1)
    selected = chosen_sets(routing)
    mass = (probs * selected).sum(-1)
    assert bool((mass >= 0.6 - 1e-6).all())
    counts = selected.sum(-1)
    assert int(counts.min()) >= 1 and int(counts.max()) > int(counts.min())  # dynamic k


def test_replacement_weights_are_the_ones_used():
    torch.manual_seed(2)
    layer = MoE(MoEConfig(hidden_size=16, ff_size=8, router=preset("qwen3_moe", 6, 2)))
    x = torch.randn(7, 16)
    with torch.no_grad():
        y1, r1 = layer.forward_with_routing(x, override=RoutingOverride(weights=torch.ones(6)))
        y2, r2 = layer.forward_with_routing(x, override=RoutingOverride(weights=torch.full((6,), 3.0)))
        y0, r0 = layer.forward_with_routing(x)
    assert torch.equal(r1.kept.expert, r0.kept.expert)  # same experts, new weights
    assert bool((r1.kept.weight == 1).all())
    torch.testing.assert_close(y2, 3 * y1, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y1, y0)


def test_where_limits_the_override_to_positions():
    model = tiny_lm(seed=3)
    where = torch.zeros(9, dtype=torch.bool)
    where[-3:] = True
    with torch.no_grad():
        plain = model(IDS)
        with override_routing(model, RoutingOverride(force=[5], where=where)):
            out = model(IDS)
    for a, b in zip(plain.routings, out.routings, strict=True):
        sel_a, sel_b = chosen_sets(a).view(2, 9, 8), chosen_sets(b).view(2, 9, 8)
        assert torch.equal(sel_a[:, :-3], sel_b[:, :-3])
        assert bool(sel_b[:, -3:, 5].all())
    # attention is causal: logits before the first overridden position do not change (up to the
    # rounding of experts computing a different set of tokens)
    torch.testing.assert_close(plain.logits[:, :6], out.logits[:, :6], atol=1e-6, rtol=1e-6)
    assert not torch.equal(plain.logits[:, 6:], out.logits[:, 6:])


def test_overrides_in_generation_and_capture_per_step():
    model = tiny_lm(seed=4)
    capture = RoutingCapture()
    ids = IDS[:, :4]
    out = generate(
        model,
        ids,
        max_new_tokens=5,
        overrides=Overrides(layers={-1: RoutingOverride(force=[7])}, capture=capture),
    )
    assert len(capture.routings[0]) == 5 and len(capture.routings[1]) == 5
    assert all(bool(chosen_sets(r)[:, 7].all()) for r in capture.routings[1])
    assert not all(bool(chosen_sets(r)[:, 7].all()) for r in capture.routings[0])
    assert out.shape == (2, 9)
    for _, _, layer in moe_layers(model):
        assert layer.routing_override is None  # restored after generation


def test_layers_by_name_nesting_restores_and_bad_overrides():
    model = tiny_lm(seed=5)
    names = [name for _, name, _ in moe_layers(model)]
    with override_routing(model, {names[1]: RoutingOverride(top_k=1)}):
        assert model.moe_layers[1].routing_override.override.top_k == 1
        with override_routing(model, {1: RoutingOverride(top_k=3)}):
            assert model.moe_layers[1].routing_override.override.top_k == 3
        assert model.moe_layers[1].routing_override.override.top_k == 1
    assert model.moe_layers[1].routing_override is None
    with pytest.raises(MoekitError, match="2 MoE layers"):
        override_routing(model, {5: RoutingOverride(top_k=1)}).__enter__()
    with pytest.raises(MoekitError, match="top_k"):
        RoutingOverride(top_k=-1)
    with (
        pytest.raises(MoekitError, match="both forced and masked"),
        override_routing(model, RoutingOverride(force=[1], mask=[1])),
    ):
        model(IDS)
    with (
        pytest.raises(MoekitError, match="logit_bias"),
        override_routing(model, RoutingOverride(logit_bias=torch.zeros(5))),
    ):
        model(IDS)
    chooser = tiny_lm(router=None, router_kind="expert_choice")
    with pytest.raises(MoekitError, match="router_kind is 'expert_choice'"):
        override_routing(chooser, RoutingOverride(top_k=1)).__enter__()
    with pytest.raises(MoekitError, match="no moekit MoE layers"):
        override_routing(torch.nn.Linear(2, 2), RoutingOverride()).__enter__()
