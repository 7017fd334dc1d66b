"""RoPE's rotation ("half" layout) in one pass of moekit's kernel (`csrc/rope.cpp`), forward and
backward, where it gives torch's values bit for bit (decided once per process by a probe, like
`kernels.rms_norm`; `MOEKIT_NATIVE=0` at the first use turns it off with the others).

transformers' x * cos + rotate_half(x) * sin is five ops, each with its own setup and its own pass
over x's size: about 10 us for a decoding step's queries and keys on one core of an AVX2 EPYC, and
in training about a tenth of a small model's step (its backward adds zero-filled gradients for the
slices). The arithmetic is two products and a sum per value, which the kernel repeats in torch's
order, so a model trains and generates in the same bits with it or without it.

Two conventions for the sine, one kernel: `interop.rope.head_tables` negates its first half so that
the rotation is a swap of the halves (`signed_sin=True`); `models.lm.rope_tables` gives it as it
comes, and the first half's swapped product is subtracted.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from moekit.kernels import native


def torch_rotation(x: Tensor, cos: Tensor, sin: Tensor, signed_sin: bool = True) -> Tensor:
    """The ops the kernel stands in for, cos and sin broadcast against x [B, N, S, D]: with
    `signed_sin`, x * cos + roll(x, D / 2) * sin (`interop.rope.apply_rope`, "half"); else
    transformers' x * cos + cat(-x2, x1) * sin (`models.lm.apply_rope`)."""
    half = x.shape[-1] // 2
    if signed_sin:
        return (x * cos) + (torch.roll(x, half, dims=-1) * sin)
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _fits(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether the kernel takes x [B, N, S, D] (fp32 on the CPU, unit feature stride, D even) and
    its tables: [B or 1, 1, S, D] or [B or 1, S, D], contiguous fp32 CPU tensors of one shape that
    need no gradient. Checked on every decoding step, so with torch's cheapest attribute reads."""
    shape, table = x.shape, cos.shape
    if len(shape) != 4 or shape[3] % 2 or table != sin.shape or len(table) not in (3, 4):
        return False
    if table[-1] != shape[3] or table[-2] != shape[2] or table[0] not in (1, shape[0]):
        return False
    if len(table) == 4 and table[1] != 1:
        return False
    return (
        x.dtype == cos.dtype == sin.dtype == torch.float32
        and x.is_cpu
        and cos.is_cpu
        and sin.is_cpu
        and x.stride(3) == 1
        and cos.is_contiguous()
        and sin.is_contiguous()
        and not (cos.requires_grad or sin.requires_grad)
    )


class _HalfRotation(torch.autograd.Function):
    """The rotation with the kernel's backward (the transposed rotation of dL/dy)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, signed_sin: bool) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.signed_sin = signed_sin
        return torch.ops.moekit.rope_half(x, cos, sin, signed_sin, False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return torch.ops.moekit.rope_half(grad, cos, sin, ctx.signed_sin, True), None, None, None


def rotate_half(x: Tensor, cos: Tensor, sin: Tensor, signed_sin: bool = True) -> Tensor:
    """`torch_rotation(x, cos, sin, signed_sin)` for queries or keys x [B, N, S, D], on the kernel
    (differentiable in x) where fp32 CPU operands allow it and the probe passed, else torch's ops."""
    if _fits(x, cos, sin) and not torch.compiler.is_compiling() and matches_torch():
        if torch.is_grad_enabled() and x.requires_grad:
            return _HalfRotation.apply(x, cos, sin, signed_sin)
        return torch.ops.moekit.rope_half(x, cos, sin, signed_sin, False)
    return torch_rotation(x, cos, sin, signed_sin)


QUERY_LAYOUTS = ("contiguous", "transposed", "split")


def queries(gen: torch.Generator, batch: int, heads: int, steps: int, width: int, layout: str) -> Tensor:
    """Random x [batch, heads, steps, width] laid out as a model's queries come (QUERY_LAYOUTS):
    contiguous, a transposed view of [batch, steps, heads, width] (the projection's output), or the
    heads of a fused q/k/v projection's split."""
    if layout == "contiguous":
        return torch.randn(batch, heads, steps, width, generator=gen)
    if layout == "transposed":
        return torch.randn(batch, steps, heads, width, generator=gen).transpose(1, 2)
    fused = torch.randn(batch, steps, 3 * heads * width, generator=gen)
    return fused[..., heads * width : 2 * heads * width].view(batch, steps, heads, width).transpose(1, 2)


@cache
def matches_torch() -> bool:
    """Whether the kernel is built and gives torch's values and gradients bit for bit, in torch's
    layouts (which decide the order of later sums), on the probe: both sine conventions; queries
    contiguous, transposed and split from a fused projection; zeros, and gradients of -0, whose
    sum the backward of transformers' slices turns to +0."""
    if not native.loops_available() or not hasattr(torch.ops.moekit, "rope_half"):
        return False
    gen = torch.Generator().manual_seed(0)
    shapes = ((1, 6, 1, 16), (2, 20, 1, 64), (1, 3, 5, 128), (3, 1, 1, 2), (2, 2, 70, 64))
    with torch.inference_mode(False), torch.enable_grad():
        for batch, heads, steps, width in shapes:
            for layout in QUERY_LAYOUTS:
                for signed_sin in (True, False):
                    x = queries(gen, batch, heads, steps, width, layout) * 3
                    cos, sin = (torch.randn(batch, 1, steps, width, generator=gen) for _ in range(2))
                    x[..., ::7] = 0.0
                    grad = torch.randn(x.shape, generator=gen)
                    grad[:, :, 0] = -0.0
                    if not _agrees(x, cos, sin, grad, signed_sin):
                        return False
    return True


def _agrees(x: Tensor, cos: Tensor, sin: Tensor, grad: Tensor, signed_sin: bool) -> bool:
    """The kernel's rotation of x and its gradient for dL/dy = grad against torch's ops'."""
    arriving = []  # the gradients as they arrive, before accumulation
    ours, theirs = x.detach().requires_grad_(), x.detach().requires_grad_()
    for leaf in (ours, theirs):
        leaf.register_hook(arriving.append)
    y = _HalfRotation.apply(ours, cos, sin, signed_sin)
    expected = torch_rotation(theirs, cos, sin, signed_sin)
    y.backward(grad)
    expected.backward(grad)
    return (
        native.same_bits(y, expected)
        and native.same_layout(y, expected)
        and native.same_bits(*arriving)
        and native.same_layout(*arriving)
    )
