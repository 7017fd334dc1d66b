"""The fast MoE layer against the float64 reference: outputs and every gradient, every preset."""

from unittest.mock import patch

import pytest
import torch

import moekit.dispatch.grouped as grouped_module
from helpers import torch_threads
from moekit import MoE, MoEConfig, preset
from moekit.dispatch.grouped import grouped_mm_available
from moekit.dispatch.reference import reference_moe
from moekit.kernels.native import loops_available
from moekit.routing.spec import PRESET_NAMES

pytestmark = pytest.mark.portable

HIDDEN, FF = 16, 12


def preset_layer(
    name: str, capacity_factor=None, drop_policy="position", backend="auto", activation=None
) -> MoE:
    """A small layer in the family's own shape: its activation, biases, shared experts, groups."""
    num_experts, k = 8, 2
    extra = {}
    if name == "deepseek_v3":
        extra = dict(num_groups=4, topk_groups=2)
    if name == "llama4":
        k = 1
    spec = preset(name, num_experts, k, capacity_factor=capacity_factor, drop_policy=drop_policy, **extra)
    kwargs = dict(activation="swiglu")
    if name == "gpt_oss":
        kwargs = dict(activation="clamped_swiglu", expert_bias=True, swiglu_limit=1.0)
    if name == "qwen2_moe":
        kwargs.update(num_shared_experts=1, shared_ff_size=20, shared_gate=True)
    if name in ("deepseek_v3", "llama4"):
        kwargs.update(num_shared_experts=2 if name == "deepseek_v3" else 1)
    if activation is not None:
        kwargs["activation"] = activation
    layer = MoE(MoEConfig(hidden_size=HIDDEN, ff_size=FF, router=spec, backend=backend, **kwargs))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
        if layer.router.selection_bias is not None:
            layer.router.selection_bias.normal_(0, 0.1)
    return layer.eval()


def compare_with_reference(layer: MoE, dtype: torch.dtype, mask: bool, rtol: float, atol: float) -> None:
    x = torch.randn(3, 7, HIDDEN, dtype=torch.float64)
    token_mask = (torch.rand(3, 7) > 0.3) if mask else None
    layer = layer.to(dtype)
    x_ref = x.clone().requires_grad_()
    ref = reference_moe(layer, x_ref, token_mask)
    upstream = torch.randn_like(ref.output)
    (ref.output * upstream).sum().backward()

    x_fast = x.to(dtype).requires_grad_()
    y, routing = layer.forward_with_routing(x_fast, token_mask)
    (y * upstream.to(dtype)).sum().backward()

    torch.testing.assert_close(y.double(), ref.output.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(x_fast.grad.double(), x_ref.grad, rtol=rtol, atol=atol)
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.double(), ref.params[name].grad, rtol=rtol, atol=atol, msg=name)
    # same routing decisions as the reference
    kept = sorted(zip(routing.kept.token.tolist(), routing.kept.expert.tolist(), strict=True))
    assert kept == sorted((c.token, c.expert) for c in ref.kept)
    dropped = sorted(zip(routing.dropped.token.tolist(), routing.dropped.expert.tolist(), strict=True))
    assert dropped == sorted((c.token, c.expert) for c in ref.dropped)


CASES = [(None, "position"), (0.5, "position"), (0.75, "score")]


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("capacity_factor,policy", CASES)
@pytest.mark.parametrize("mask", [False, True])
def test_float64_fast_path_equals_reference(name, capacity_factor, policy, mask):
    layer = preset_layer(name, capacity_factor, policy, backend="loop")
    compare_with_reference(layer, torch.float64, mask, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_float32_fast_path_close_to_reference(name, backend):
    if backend == "grouped_mm" and not grouped_mm_available():
        pytest.skip("torch.nn.functional.grouped_mm needs torch >= 2.9")
    layer = preset_layer(name, capacity_factor=0.75, backend=backend)
    compare_with_reference(layer, torch.float32, mask=True, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("activation", ["gelu", "relu2"])
def test_other_activations_equal_reference(activation):
    layer = preset_layer("qwen3_moe", activation=activation, backend="loop")
    compare_with_reference(layer, torch.float64, mask=True, rtol=1e-10, atol=1e-10)


def test_dropped_assignments_contribute_zero_and_residual_carries_token():
    layer = preset_layer("mixtral", capacity_factor=0.25)
    x = torch.randn(40, HIDDEN)
    y, routing = layer.forward_with_routing(x)
    assert len(routing.dropped) > 0
    fully_dropped = set(range(40)) - set(routing.kept.token.tolist())
    assert fully_dropped, "expected some token to lose every assignment at capacity 0.25"
    for t in fully_dropped:
        assert torch.count_nonzero(y[t]) == 0  # no routed contribution; a residual x + y keeps x


@pytest.mark.parametrize("backend", ["auto", "grouped_mm", "loop"])
def test_decode_sized_inputs_close_to_reference(backend):
    """A few tokens over many experts (decode): the single-threaded grouped_mm path and its
    grouped weight gradients, against the float64 reference."""
    if backend == "grouped_mm" and not grouped_mm_available():
        pytest.skip("torch.nn.functional.grouped_mm needs torch >= 2.9")
    spec = preset("qwen3_moe", 16, 2)
    layer = MoE(MoEConfig(hidden_size=HIDDEN, ff_size=FF, router=spec, backend=backend))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    layer.eval()
    x = torch.randn(3, HIDDEN, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    ref = reference_moe(layer, x_ref)
    upstream = torch.randn_like(ref.output)
    (ref.output * upstream).sum().backward()
    x_fast = x.float().requires_grad_()
    y = layer(x_fast)
    (y * upstream.float()).sum().backward()
    torch.testing.assert_close(y.double(), ref.output.detach(), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(x_fast.grad.double(), x_ref.grad, rtol=2e-4, atol=2e-4)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref.params[name].grad, rtol=2e-4, atol=2e-4, msg=name)
        if "experts" in name:
            used = set(torch.topk(layer.router.logits(x.float()), 2).indices.flatten().tolist())
            unused = [e for e in range(16) if e not in used]
            assert torch.count_nonzero(p.grad[unused]) == 0  # experts with no tokens: exactly zero


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("caller_threads", [1, 2])
def test_decode_path_close_to_reference(name, caller_threads):
    """Decode-sized steps (one token per row, some rows masked) on `auto`: the C++ loops on the
    caller's threads (one, or two as generation may choose by timing), one thread for a single
    active expert, every preset; output and every gradient against the float64 reference."""
    layer = preset_layer(name)
    x = torch.randn(3, 1, HIDDEN, dtype=torch.float64)
    token_mask = torch.tensor([[True], [False], [True]])
    x_ref = x.clone().requires_grad_()
    ref = reference_moe(layer, x_ref, token_mask)
    upstream = torch.randn_like(ref.output)
    (ref.output * upstream).sum().backward()
    plans = []
    plan_experts = grouped_module.plan_experts

    def recording_plan(*args, **kwargs):
        plans.append(plan_experts(*args, **kwargs))
        return plans[-1]

    x_fast = x.float().requires_grad_()
    with torch_threads(caller_threads), patch.object(grouped_module, "plan_experts", recording_plan):
        y = layer(x_fast, token_mask)
        (y * upstream.float()).sum().backward()
    torch.testing.assert_close(y.double(), ref.output.detach(), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(x_fast.grad.double(), x_ref.grad, rtol=2e-4, atol=2e-4)
    for param_name, p in layer.named_parameters():
        torch.testing.assert_close(
            p.grad.double(), ref.params[param_name].grad, rtol=2e-4, atol=2e-4, msg=param_name
        )
    assert plans and all(plan.groups.token.numel() <= 4 for plan in plans)
    if loops_available():
        assert all(plan.path == "decode" for plan in plans)
        for plan in plans:
            assert plan.loops.threads == (caller_threads if len(plan.groups.nonempty) > 1 else 1)
