"""Latent experts (MoLE #14), LoRA experts on a frozen FFN (LoRAMoE #36) and rank-wise LoRA
experts (SMoRA #47), each held to the property that defines it."""

import torch

from moekit.experts.latent import LatentExperts
from moekit.experts.lora import LoRAExperts, low_rank_mixture
from moekit.experts.packed import PackedExperts
from moekit.layer import MoE, MoEConfig
from moekit.models.lm import DenseFFN
from moekit.routing.spec import RouterSpec

HIDDEN, FF = 24, 8


def make_layer(experts_kind, options, num_experts=4, top_k=2, **config):
    return MoE(
        MoEConfig(
            hidden_size=HIDDEN,
            ff_size=FF,
            router=RouterSpec(num_experts=num_experts, top_k=top_k),
            experts_kind=experts_kind,
            experts_options=options,
            backend="loop",
            **config,
        )
    )


# ---- latent experts (MoLE) ---------------------------------------------------------------------


def test_latent_experts_parameter_count():
    layer = make_layer("latent", {"latent_size": 6}, num_experts=5)
    experts = layer.experts
    per_expert = 2 * FF * 6 + 6 * FF  # B_in [2ff, r] (SwiGLU) and B_out [r, ff]
    assert experts.expert_parameter_count() == per_expert
    assert sum(p.numel() for p in experts.parameters()) == 2 * 6 * HIDDEN + 5 * per_expert
    standard = sum(p[0].numel() for p in make_layer("packed", {}, num_experts=5).experts.parameters())
    assert per_expert / standard == 6 / HIDDEN  # both matrices shrink by r / d


def test_latent_experts_with_identity_projections_are_standard_experts():
    torch.manual_seed(0)
    layer = make_layer("latent", {"latent_size": HIDDEN}).double()
    standard = make_layer("packed", {}).double()
    standard.router.load_state_dict(layer.router.state_dict())
    with torch.no_grad():
        layer.experts.proj_in.weight.copy_(torch.eye(HIDDEN))
        layer.experts.proj_out.weight.copy_(torch.eye(HIDDEN))
        standard.experts.w_in.copy_(layer.experts.latent_experts.w_in)
        standard.experts.w_out.copy_(layer.experts.latent_experts.w_out)
    x = torch.randn(30, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(layer(x), standard(x))


def test_latent_conversion_reproduces_experts_that_share_a_latent_space():
    """Experts whose maps share an r-dimensional row/column space convert exactly at rank r."""
    torch.manual_seed(1)
    layer = make_layer("packed", {}, num_experts=6).double()
    experts: PackedExperts = layer.experts
    r = 5
    shared_in, shared_out = (
        torch.randn(r, HIDDEN, dtype=torch.float64),
        torch.randn(HIDDEN, r, dtype=torch.float64),
    )
    with torch.no_grad():
        experts.w_in.copy_(torch.randn(6, 2 * FF, r, dtype=torch.float64) @ shared_in)
        experts.w_out.copy_(shared_out @ torch.randn(6, r, FF, dtype=torch.float64))
    latent = LatentExperts.from_packed(experts, r)
    x = torch.randn(40, HIDDEN, dtype=torch.float64)
    routing = layer.router(x)
    torch.testing.assert_close(latent.compute(x, routing), experts.compute(x, routing))
    smaller = LatentExperts.from_packed(experts, r - 2)
    assert not torch.allclose(smaller.compute(x, routing), experts.compute(x, routing))


# ---- LoRA experts (LoRAMoE) --------------------------------------------------------------------


def lora_layer(**options):
    return make_layer("lora", {"rank": 3, **options}, num_experts=4, top_k=4)


def test_lora_experts_start_as_the_frozen_dense_ffn():
    torch.manual_seed(2)
    dense = DenseFFN(HIDDEN, FF)
    layer = lora_layer()
    layer.experts.load_base(dense.proj_in.weight, dense.proj_out.weight)
    x = torch.randn(3, 7, HIDDEN)
    torch.testing.assert_close(layer(x), dense(x))


def test_only_adapters_and_router_train():
    torch.manual_seed(3)
    layer = lora_layer()
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {
        "router.weight",
        "experts.lora_in_a",
        "experts.lora_in_b",
        "experts.lora_out_a",
        "experts.lora_out_b",
    }
    x = torch.randn(20, HIDDEN)
    layer(x).square().sum().backward()
    assert layer.experts.base_in.grad is None and layer.experts.base_out.grad is None
    assert layer.experts.lora_in_b.grad.abs().sum() > 0  # B learns first; A and the router wait for it
    with torch.no_grad():
        layer.experts.lora_in_b.normal_()
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.experts.lora_in_a.grad.abs().sum() > 0
    unfrozen = make_layer("lora", {"rank": 3, "freeze_base": False}, num_experts=4, top_k=4)
    assert unfrozen.experts.base_in.requires_grad


def test_low_rank_mixture_is_the_gated_sum_of_the_experts_loras():
    torch.manual_seed(4)
    x = torch.randn(9, 5, dtype=torch.float64)
    a = torch.randn(3, 2, 5, dtype=torch.float64)
    b = torch.randn(3, 7, 2, dtype=torch.float64)
    gates = torch.rand(9, 3, dtype=torch.float64) * (torch.rand(9, 3) > 0.4)
    expected = sum(gates[:, i : i + 1] * 0.5 * (x @ a[i].t() @ b[i].t()) for i in range(3))
    torch.testing.assert_close(low_rank_mixture(x, a, b, gates, 0.5), expected)


def test_lora_experts_respect_sparse_routing_and_null_experts():
    """Only routed (real) experts' adapters touch a token: a token routed to nothing gets the base FFN."""
    torch.manual_seed(5)
    layer = MoE(
        MoEConfig(
            hidden_size=HIDDEN,
            ff_size=FF,
            router=RouterSpec(num_experts=4, top_k=2, renorm="sum"),
            router_kind="null_experts",
            router_options={"num_null": 4},
            experts_kind="lora",
            experts_options={"rank": 2},
        )
    )
    with torch.no_grad():
        layer.experts.lora_in_b.normal_()
        layer.experts.lora_out_b.normal_()
    x = torch.randn(400, HIDDEN)
    y, routing = layer.forward_with_routing(x)
    none = routing.experts_per_token() == 0
    assert none.any() and (~none).any()
    experts = layer.experts
    base = torch.nn.functional.linear(
        experts.activation.forward(torch.nn.functional.linear(x, experts.base_in)), experts.base_out
    )
    torch.testing.assert_close(y[none], base[none])
    assert not torch.allclose(y[~none], base[~none])


# ---- SMoRA -------------------------------------------------------------------------------------


def test_smora_ranks_are_experts_of_one_lora():
    """With every rank selected at weight 1, SMoRA is one rank-R LoRA scaled alpha / R."""
    torch.manual_seed(6)
    layer = make_layer("smora", {"alpha": 4.0}, num_experts=6, top_k=6).double()
    experts: LoRAExperts = layer.experts
    assert experts.rank == 1 and experts.expert_parameter_count() == HIDDEN + 2 * FF + FF + HIDDEN
    with torch.no_grad():
        experts.lora_in_b.normal_()
    x = torch.randn(10, HIDDEN, dtype=torch.float64)
    routing = layer.router(x)
    ones = type(routing.kept)(
        routing.kept.token, routing.kept.expert, torch.ones_like(routing.kept.weight), routing.kept.rank
    )
    routing = type(routing)(routing.logits, routing.scores, ones, routing.dropped, routing.token_mask, 6)
    a_full = experts.lora_in_a.reshape(6, HIDDEN)  # [R, d]
    b_full = experts.lora_in_b[:, :, 0].t()  # [in, R]
    h = x @ experts.base_in.t() + (4.0 / 6) * (x @ a_full.t() @ b_full.t())
    expected = experts.activation.forward(h) @ experts.base_out.t()
    torch.testing.assert_close(experts.compute(x, routing), expected)


def test_restoring_the_lora_init_silences_the_adapters_and_keeps_the_base():
    """What a model calls after re-initialising every matrix: B back to zero, the base untouched."""
    layer = lora_layer()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_()
    base = layer.experts.base_in.detach().clone()
    layer.experts.restore_own_init()
    assert torch.equal(layer.experts.base_in, base)
    assert layer.experts.lora_in_b.abs().sum() == 0 and layer.experts.lora_out_b.abs().sum() == 0
    assert layer.experts.lora_in_a.abs().max() <= HIDDEN**-0.5
