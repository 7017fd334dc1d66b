"""The decode step's fast paths: each gives what the path it short-cuts gives (bit for bit where
it runs the same kernels), against float64, on one thread and on two."""

import dataclasses
from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit.dispatch.few_rows as few_rows_module
from moekit.dispatch.grouped import grouped_experts
from moekit.dispatch.reference import reference_moe
from moekit.interop.attention import RMSNorm
from moekit.layer import MoE, MoEConfig
from moekit.routing.spec import preset


def hf_rms_norm(x, weight, eps):
    """transformers' RMSNorm, operation for operation."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    width=st.sampled_from([1, 7, 16, 32, 100, 1024]),
    eps=st.sampled_from([1e-6, 1e-5]),
    seed=st.integers(0, 2**16),
)
def test_fp32_rms_norm_in_one_op_is_transformers_arithmetic_bit_for_bit(rows, width, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(width, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=gen))
    x = torch.randn(rows, 1, width, generator=gen) * 3
    assert torch.equal(norm(x), hf_rms_norm(x, norm.weight, eps))
    exact = hf_rms_norm(x.double(), norm.weight.double(), eps)
    torch.testing.assert_close(norm(x).double(), exact, rtol=1e-6, atol=1e-6)


def test_rms_norm_keeps_transformers_steps_for_other_dtypes():
    """float64 is normalised in fp32 (as transformers does), bf16 through fp32: not the fused op."""
    norm = RMSNorm(16, 1e-6)
    for dtype in (torch.float64, torch.bfloat16):
        x = torch.randn(3, 16).to(dtype)
        assert torch.equal(norm(x), hf_rms_norm(x, norm.weight, 1e-6))


def small_layer(activation="swiglu", bias=False, weight_on="output", seed=0):
    torch.manual_seed(seed)
    router = preset("qwen3_moe", 8, 2)
    if weight_on == "input":
        router = dataclasses.replace(router, weight_on="input")
    config = MoEConfig(hidden_size=32, ff_size=16, router=router, activation=activation, expert_bias=bias)
    layer = MoE(config).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "activation,bias,weight_on",
    [("swiglu", False, "output"), ("gelu", True, "output"), ("swiglu", True, "input")],
)
def test_few_rows_experts_equal_the_planned_path_and_float64(threads, activation, bias, weight_on):
    """A decode step (one token per row, a row masked) outside autograd takes the few-rows path;
    its output is the planned grouped_mm path's bit for bit and the float64 reference's."""
    layer = small_layer(activation, bias, weight_on)
    x = torch.randn(3, 1, 32)
    mask = torch.tensor([[True], [False], [True]])
    calls = []
    original = few_rows_module.few_rows_experts

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode(), patch.object(few_rows_module, "few_rows_experts", counted):
            fast = layer(x, mask)
        assert calls, "the few-rows path did not run"
        experts = layer.experts
        with torch.inference_mode():
            routing = layer.router(x.reshape(-1, 32), mask.reshape(-1))
            a = routing.compute_assignments
            planned = grouped_experts(
                x.reshape(-1, 32), a.token, a.expert, a.weight, experts.w_in, experts.w_out,
                experts.b_in, experts.b_out, experts.activation, weight_on, backend="grouped_mm",
            )  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(fast.reshape(-1, 32), planned)
    reference = reference_moe(layer.double(), x.double(), mask).output
    torch.testing.assert_close(fast.double(), reference, rtol=1e-5, atol=1e-5)


def test_few_rows_path_is_not_taken_where_gradients_or_large_experts_are():
    layer = small_layer()
    x = torch.randn(2, 1, 32)
    experts = layer.experts
    args = (experts.w_in, experts.w_out, None, None)
    with torch.no_grad():
        assert few_rows_module.few_rows_fit(x, 4, *args)
        assert not few_rows_module.few_rows_fit(x, 10**6, *args)  # reads long enough to thread
    assert not few_rows_module.few_rows_fit(x, 4, *args)  # autograd wants the weights' gradients


@pytest.mark.parametrize(
    "activation,bias,weight_on",
    [("swiglu", False, "output"), ("gelu", True, "output"), ("swiglu", True, "input")],
)
def test_compiled_paths_gathered_form_equals_float64_and_drops_null_experts(activation, bias, weight_on):
    """With fewer assignments than experts `compiled_experts` gathers each assignment's expert
    weights (the arithmetic the few-rows path shares): the float64 reference's output, and an
    assignment to a null expert (id E) changes nothing."""
    from moekit.dispatch.compiled import compiled_experts

    layer = small_layer(activation, bias, weight_on)
    x = torch.randn(3, 32)
    experts = layer.experts
    args = (experts.w_in, experts.w_out, experts.b_in, experts.b_out, experts.activation, weight_on)
    with torch.no_grad():
        a = layer.router(x, None).compute_assignments
        assert len(a.token) < experts.w_in.shape[0]  # the gathered form, not the dense one
        got = compiled_experts(x, a.token, a.expert, a.weight, *args)
        null = experts.w_in.shape[0]
        token, expert = torch.cat([a.token, a.token[:1]]), torch.cat([a.expert, torch.tensor([null])])
        with_null = compiled_experts(x, token, expert, torch.cat([a.weight, torch.tensor([0.7])]), *args)
    assert torch.equal(got, with_null)
    reference = reference_moe(layer.double(), x.double()).output
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)
