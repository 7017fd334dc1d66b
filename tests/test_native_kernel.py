"""moekit's own expert kernels (`moekit.kernels.native`) against float64: the GEMM on every operand
layout the expert loops use and on ragged shapes, its use by the layer's worker paths, and SwiGLU
with its derivative."""

import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.dispatch.grouped import plan_experts
from moekit.experts.activations import make_activation, swiglu_with_grad
from moekit.kernels.native import (
    MIN_SPLIT_ELEMENTS,
    cpu_has_avx512,
    mm_into,
    native_available,
    native_fits,
    swiglu_fits,
)

needs_native = pytest.mark.skipif(
    not native_available(),
    reason="the native kernel needs an AVX-512 CPU and a C++ compiler; without them the library "
    "kernels run, and the dispatch tests cover those",
)

# How each layout the expert loops use is formed from a [rows, inner] input, a weight [outer, inner]
# and gradient rows [rows, outer] (a, b): forward x @ W^T, input gradient g @ W, weight gradient g^T @ x.
LAYOUTS = ("forward", "input_grad", "weight_grad")


def _operands(layout: str, rows: int, inner: int, outer: int, gen: torch.Generator):
    x = torch.randn(rows, inner, generator=gen)
    weight = torch.randn(outer, inner, generator=gen)
    grad = torch.randn(rows, outer, generator=gen)
    if layout == "forward":
        return x, weight.t()
    if layout == "input_grad":
        return grad, weight
    return grad.t(), x


def test_a_cpu_with_avx512_and_a_compiler_runs_the_native_kernel():
    """Where it can be built and is not turned off, it runs (a failed build would silently cost
    the layer its speed)."""
    if cpu_has_avx512() and shutil.which("c++") and os.environ.get("MOEKIT_NATIVE", "1") != "0":
        assert native_available()


@needs_native
@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(LAYOUTS),
    st.integers(0, 20),
    st.integers(0, 300),
    st.integers(0, 140),
    st.integers(0, 3),
    st.sampled_from(["none", "dense", "transposed", "strided"]),
    st.integers(0, 2**16),
)
def test_products_match_float64_and_touch_only_their_output(layout, rows, inner, outer, pad, prefetch, seed):
    """Every row and column tail (tiles of 6 rows x 64 columns, inner blocks of 256, packed weight
    panels of 16 x 16), including empty operands, into a view of a larger buffer whose other
    entries stay as they were; with or without memory to prefetch (a strided view is skipped)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _operands(layout, rows, inner, outer, gen)
    upcoming = {
        "none": None,
        "dense": torch.randn(37, 50),
        "transposed": torch.randn(50, 37).t(),
        "strided": torch.randn(40, 40)[::3, ::2],
    }[prefetch]
    buffer = torch.full((a.shape[0] + 2 * pad, b.shape[1] + pad), float("nan"))
    out = buffer[pad : pad + a.shape[0], : b.shape[1]]
    mm_into(a, b, out, upcoming)
    expected = a.double() @ b.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4 * max(1.0, inner**0.5))
    untouched = torch.ones_like(buffer, dtype=torch.bool)
    untouched[pad : pad + a.shape[0], : b.shape[1]] = False
    assert torch.isnan(buffer[untouched]).all()


@needs_native
def test_bad_operands_get_a_clear_error():
    a, b = torch.randn(4, 8), torch.randn(8, 5)
    with pytest.raises(RuntimeError, match="float32"):
        mm_into(a.double(), b.double(), torch.empty(4, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="do not match"):
        mm_into(a, b, torch.empty(5, 5))
    with pytest.raises(RuntimeError, match="unit column stride"):
        mm_into(a, b, torch.empty(5, 4).t())
    with pytest.raises(RuntimeError, match="unit stride along one dimension"):
        mm_into(a, torch.randn(16, 10)[::2, ::2], torch.empty(4, 5))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_worker_plans_take_the_native_kernel_for_float32_only(dtype):
    gen = torch.Generator().manual_seed(0)
    num_experts, hidden, ff = 4, 16, 8
    act = make_activation("swiglu")
    x = torch.randn(64, hidden, generator=gen, dtype=dtype)
    token = torch.arange(64).repeat_interleave(2)
    expert = torch.arange(128) % num_experts
    order = torch.argsort(expert, stable=True)
    w_in = torch.randn(num_experts, act.in_features(ff), hidden, dtype=dtype)
    w_out = torch.randn(num_experts, hidden, ff, dtype=dtype)
    for parallel in (True, False):
        plan = plan_experts(
            x, token[order], expert[order], w_in, w_out, act, backend="loop", parallel_workers=parallel
        )
        assert plan.native == (parallel and dtype == torch.float32)
    assert not native_fits(x.float(), torch.randn(num_experts, 16, 16)[:, ::2, ::2])


def _swiglu_float64(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@needs_native
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 20), st.integers(1, 70), st.sampled_from([1.0, 30.0]), st.integers(0, 2**16))
def test_swiglu_and_its_derivative_match_float64(rows, ff, scale, seed):
    """Column tails of 16, and gates far into both saturated ends of the sigmoid (scale 30)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, 2 * ff, generator=gen) * scale
    grad = torch.randn(rows, ff, generator=gen)
    act = make_activation("swiglu")
    assert swiglu_fits(h)
    exact = h.double().requires_grad_()
    expected = _swiglu_float64(exact)
    (expected_grad,) = torch.autograd.grad(expected, exact, grad.double()) if rows else (exact * 0,)
    torch.testing.assert_close(act.forward(h).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(act.backward(h, grad).double(), expected_grad, rtol=1e-4, atol=1e-4)


@needs_native
def test_swiglu_split_over_the_workers_and_under_autograd_matches_float64():
    """Inputs large enough to be split over torch's threads, and `swiglu_with_grad`, which dense
    layers differentiate through, against autograd in float64."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(3001, 2 * 40, generator=gen)
    assert h.numel() >= MIN_SPLIT_ELEMENTS
    grad = torch.randn(3001, 40, generator=gen)
    leaf = h.clone().requires_grad_()
    assert not swiglu_fits(leaf)  # autograd would not see the native op: it must not run there
    out = swiglu_with_grad(leaf)
    (got,) = torch.autograd.grad(out, leaf, grad)
    exact = h.double().requires_grad_()
    expected = _swiglu_float64(exact)
    (expected_grad,) = torch.autograd.grad(expected, exact, grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), expected_grad, rtol=1e-4, atol=1e-4)
