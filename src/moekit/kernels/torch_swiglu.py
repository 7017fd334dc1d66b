"""SwiGLU under autograd in torch's own bits, one pass each way (`csrc/torch_swiglu.cpp`), for the
layers that differentiate through torch's silu(gate) * up (shared experts).

torch computes it as silu, a product and, backward, two products, silu's derivative and the
concatenation of the halves' gradients, each a pass over the rows; the kernel repeats the
arithmetic of torch's vector kernels (SLEEF's exp, fused multiply-adds where torch's build fuses
them), so a model trains in the same bits with it or without it. torch computes a row's last
values past a whole number of vector steps with its scalar code (libm's exp): the kernel takes
rows of a multiple of 32 values (two AVX-512 vectors, torch's widest step), and runs only where a
probe at first use finds torch's values and gradients bit for bit (`MOEKIT_NATIVE=0` at the first
use turns it off with the other kernels).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from moekit.kernels import native

# torch's vector kernels step over 2 vectors of 8 (AVX2) or 16 (AVX-512) lanes
ROW_MULTIPLE = 32


def fits(h: Tensor) -> bool:
    """Whether `swiglu(h)` runs on the kernel: h = [gate | up] fp32 on the CPU, contiguous, halves
    of a multiple of ROW_MULTIPLE values, outside `torch.compile`, where the probe passed."""
    return (
        h.dtype == torch.float32
        and h.is_cpu
        and h.dim() >= 1
        and h.shape[-1] > 0
        and h.shape[-1] % (2 * ROW_MULTIPLE) == 0
        and h.is_contiguous()
        and not torch.compiler.is_compiling()
        and matches_torch()
    )


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) * up for h = [gate | up] (where `fits`), differentiable in h."""
    if torch.is_grad_enabled() and h.requires_grad:
        return _TorchSwiGLU.apply(h)
    return torch.ops.moekit.torch_swiglu_forward(h)


def torch_swiglu(h: Tensor) -> Tensor:
    """The ops the kernel stands in for: h's halves as chunks, silu(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


class _TorchSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return torch.ops.moekit.torch_swiglu_forward(h)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        return torch.ops.moekit.torch_swiglu_backward(h, grad.contiguous())


@cache
def matches_torch() -> bool:
    """Whether the kernel is built and gives torch's values and gradients bit for bit on the probe:
    halves of 32, 64 and 256 values, one row to hundreds, values from zero to both sides of exp's
    overflow and underflow."""
    if not native.loops_available() or not hasattr(torch.ops.moekit, "torch_swiglu_forward"):
        return False
    gen = torch.Generator().manual_seed(0)
    edges = torch.tensor(
        [0.0, -0.0, 1e-40, -1e-40, 30.0, -30.0, 87.5, -87.5, 88.9, -88.9, 100.5, -100.5, 105.0]
    )
    with torch.inference_mode(False), torch.enable_grad():
        for rows, ff in ((1, 32), (3, 64), (300, 256), (17, 96)):
            h = torch.randn(rows, 2 * ff, generator=gen) * 4
            h[0, : len(edges)] = edges
            grad = torch.randn(rows, ff, generator=gen)
            ours, theirs = h.clone().requires_grad_(), h.clone().requires_grad_()
            y, expected = _TorchSwiGLU.apply(ours), torch_swiglu(theirs)
            y.backward(grad)
            expected.backward(grad)
            if not (native.same_bits(y, expected) and native.same_bits(ours.grad, theirs.grad)):
                return False
    return True
