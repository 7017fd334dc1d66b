"""RMSNorm on moekit's kernels (`csrc/rms_norm.cpp`), where they give torch.rms_norm's values and
gradients bit for bit (`MOEKIT_NATIVE=0` at the first use turns them off with the other kernels;
decided once per process by probes, being the same values either way): a decoding step's few
rows in one call, and many rows (training, prefill) on torch's threads with the derivative as a
kernel too (`normalize` picks).

torch's fp32 rms_norm on the CPU runs seven ops, each with its own setup: 15-30 us for a row of
32 to 1024 values (measured on an AVX2 EPYC), several per layer of a decoding step; in training,
those ops and autograd's derivative of them are passes over x's size, about a tenth of a small
model's step. The kernels repeat torch's arithmetic in torch's order, including the order in which
torch's CPU sum kernel adds a row; since that order belongs to torch's build, they are used only
where probes at first use find them equal to torch.rms_norm bit for bit (else torch's op runs, as
it does for other dtypes and strided inputs).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from moekit.kernels import native

# Elements below which torch's sum runs a reduction on one thread (its parallel grain), so that
# the order of its additions is that of one row at a time, which the kernel repeats.
MAX_ELEMENTS = 32768
PROBE_WIDTHS = (*range(1, 161), 255, 384, 1000, 1024, 2048, 2880, 4096, 7168)
TRAINING_PROBE_WIDTHS = (1, 5, 8, 13, 32, 40, 64, 100, 128, 160, 255, 384, 1000, 1024, 2880, 4096, 7168)


def fits(x: Tensor, weight: Tensor | None) -> bool:
    """Whether `rms_norm(x, weight, eps)` runs on the kernel: a small contiguous fp32 CPU input
    outside autograd (and an fp32 weight), where the probe passed."""
    if (
        x.dtype != torch.float32
        or x.device.type != "cpu"
        or x.numel() >= MAX_ELEMENTS
        or not x.is_contiguous()
    ):
        return False
    if weight is not None and (weight.dtype != torch.float32 or weight.device.type != "cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return False
    return not torch.compiler.is_compiling() and matches_torch()


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """torch.rms_norm(x, (n,), weight, eps) over the last dimension (where `fits`)."""
    return torch.ops.moekit.rms_norm_rows(x, None if weight is None else weight.contiguous(), eps)


@cache
def matches_torch() -> bool:
    """Whether the kernel is built and gives torch.rms_norm's values bit for bit on the probe."""
    if not native.loops_available() or not hasattr(torch.ops.moekit, "rms_norm_rows"):
        return False
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        for width in PROBE_WIDTHS:
            for rows in (1, 3):
                x = torch.randn(rows, 1, width, generator=gen) * 3
                weight = torch.randn(width, generator=gen)
                for w in (weight, None):
                    for eps in (1e-6, 1e-5):
                        expected = torch.rms_norm(x, (width,), w, eps)
                        if not torch.equal(torch.ops.moekit.rms_norm_rows(x, w, eps), expected):
                            return False
    return True


# Training and prefill: many rows, under autograd or not, on the kernel's threaded forward and its
# backward (`csrc/rms_norm.cpp`: `rms_norm_forward`, `rms_norm_backward`).


def normalize(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """torch.rms_norm(x, (n,), weight, eps) over the last dimension: a decoding step's few rows on
    `rms_norm_rows`, many rows and autograd on the threaded kernel and its backward, where their
    probes found torch's values and gradients bit for bit; torch's op elsewhere (other dtypes and
    devices, strided x, `torch.compile`)."""
    if _kernel_takes(x, weight):
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (weight is not None and weight.requires_grad)
        )
        if not needs_grad and x.numel() < MAX_ELEMENTS and matches_torch():
            return rms_norm(x, weight, eps)
        if training_matches_torch():
            if needs_grad:
                return _RMSNorm.apply(x, x, weight, eps)
            return torch.ops.moekit.rms_norm_forward(x, weight, eps)[0]
    return torch.rms_norm(x, (x.shape[-1],), weight, eps)


def _kernel_takes(x: Tensor, weight: Tensor | None) -> bool:
    if x.dtype != torch.float32 or not x.is_cpu or x.dim() == 0 or not x.is_contiguous():
        return False
    if weight is not None and (
        weight.dtype != torch.float32 or not weight.is_cpu or weight.dim() != 1 or not weight.is_contiguous()
    ):
        return False
    return not torch.compiler.is_compiling()


class _RMSNorm(torch.autograd.Function):
    """torch.rms_norm with the kernel's forward and backward. x comes in twice so that its two
    derivatives (through x * rstd, then through x^2) reach x's gradient one after the other, as
    autograd adds them through torch's ops: summed first, they would round differently wherever x
    has another use (the residual stream), and the model would train in other bits."""

    @staticmethod
    def forward(ctx, x_scaled: Tensor, x_squared: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        y, rstd = torch.ops.moekit.rms_norm_forward(x_scaled, weight, eps)
        ctx.save_for_backward(x_scaled, weight, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if not grad.is_contiguous():  # torch's sums over a strided gradient run in another order
            return (*_torch_gradients(grad, x, weight, ctx.eps, needs[:3]), None)
        weight_grad = weight is not None and needs[2]
        through_scale, through_square, g_normed = torch.ops.moekit.rms_norm_backward(
            grad, x, weight, rstd, weight_grad
        )
        grad_weight = g_normed.sum_to_size(weight.shape) if weight_grad else None  # as autograd reduces
        return (through_scale if needs[0] else None, through_square if needs[1] else None, grad_weight, None)


def torch_decomposition(x_scaled: Tensor, x_squared: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """torch.rms_norm's ops on the CPU under autograd (pow, mean, add, rsqrt, mul, mul), with x's two
    uses apart."""
    rstd = torch.rsqrt(x_squared.pow(2).mean(-1, keepdim=True).add_(eps))
    normed = x_scaled * rstd
    return normed if weight is None else normed * weight


def _torch_gradients(grad, x, weight, eps, needs) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The three gradients of `_RMSNorm` through torch's ops (for a gradient the kernel does not take)."""
    leaves = [x.detach().requires_grad_(needs[0]), x.detach().requires_grad_(needs[1])]
    leaves.append(None if weight is None else weight.detach().requires_grad_(needs[2]))
    with torch.enable_grad():
        y = torch_decomposition(*leaves, eps)
        wanted = [leaf for leaf, need in zip(leaves, needs, strict=True) if need and leaf is not None]
        found = iter(torch.autograd.grad(y, wanted, grad))
    return tuple(
        next(found) if need and leaf is not None else None for leaf, need in zip(leaves, needs, strict=True)
    )


@cache
def training_matches_torch() -> bool:
    """Whether the threaded kernel and its backward give torch.rms_norm's values and gradients bit
    for bit on the probe: widths around torch's vector and accumulator sizes and a few wider ones
    (the decode probe takes every width up to 160), rows enough for torch to split its sums over
    threads, with and without a weight, x with a residual use beside the norm (whose gradient
    autograd adds first), contiguous and strided gradients."""
    if not native.loops_available() or not hasattr(torch.ops.moekit, "rms_norm_forward"):
        return False
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode(False), torch.enable_grad():
        for width in TRAINING_PROBE_WIDTHS:
            rows = max(3, 40000 // width) if width in (64, 128, 1024) else 3
            for weighted in (True, False):
                for strided_grad in (False, True):
                    if not _norm_agrees(gen, rows, width, weighted, strided_grad):
                        return False
    return True


def _norm_agrees(gen: torch.Generator, rows: int, width: int, weighted: bool, strided_grad: bool) -> bool:
    """One probe case: h + norm(h) * s (the norm's output scaled through a transposed view where
    `strided_grad`, so that its gradient arrives strided), the kernel against torch.rms_norm,
    output and gradients."""
    h = torch.randn(2, rows, width, generator=gen) * 3
    weight = torch.randn(width, generator=gen) if weighted else None
    scale = torch.randn(width, generator=gen)
    outputs, grads = [], []
    for norm in (
        lambda x, w: _RMSNorm.apply(x, x, w, 1e-6),
        lambda x, w: torch.rms_norm(x, (width,), w, 1e-6),
    ):
        x = h.clone().requires_grad_()
        w = None if weight is None else weight.clone().requires_grad_()
        y = norm(x, w)
        scaled = (y.transpose(0, 1) * scale).transpose(0, 1) if strided_grad else y * scale
        (x + scaled).backward(torch.ones_like(h))
        outputs.append(y)
        grads.append((x.grad, None if w is None else w.grad))
    same = native.same_bits(outputs[0], outputs[1]) and native.same_bits(grads[0][0], grads[1][0])
    return same and (weight is None or native.same_bits(grads[0][1], grads[1][1]))
