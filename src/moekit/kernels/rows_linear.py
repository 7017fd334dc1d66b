"""A dense layer's product for the few rows of a decoding step, on moekit's row kernel.

At batch 1 a decoding step reads every dense weight once for one row: the output head and the
attention projections are pure weight reads. torch's `F.linear` (MKL's GEMV in torch's build)
reads them on one thread whatever torch's thread count: a 67 MB head at 19-20 GB/s on one and on
two threads of an AVX2 EPYC whose sum over 1 GB reads 20 and 30 GB/s. `moekit::rows_linear`
(`csrc/expert_gemm.cpp`) splits the weight's rows into chunks that torch's threads take, each read
once with eight rows in flight: 31 GB/s on two threads, and on one thread at least MKL's rate
(a decoding step of the benchmark's `large` model on one thread, under load: 5.6 % less time
than with F.linear). So every step takes the kernel for weights large enough to split, on one
thread or all (which generation times, `moekit.inference.step_threads`), and its values do not
depend on that choice; they differ from F.linear's by rounding (1e-7 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.dispatch.workers import too_small_to_share
from moekit.kernels import native

# The kernel's rows of x per call (csrc: kDotRows).
MAX_ROWS = 4


def decode_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), on the row kernel where `fits`."""
    if fits(x, weight, bias):
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.moekit.rows_linear(flat, weight, bias, torch.get_num_threads())
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def fits(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """A few fp32 CPU rows outside autograd against a weight whose read pays a thread hand-off
    (the rough rates of `dispatch.workers`), with moekit's tile kernel built: on one thread too,
    where the kernel reads as fast as MKL's GEMV or faster, so that a step's values do not depend
    on the thread count generation chooses for it."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.numel() > MAX_ROWS * x.shape[-1] or weight.stride(-1) != 1 or torch.compiler.is_compiling():
        return False
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return False
    if too_small_to_share(weight.numel() * 4):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    return native.native_ops_available()


class RowsLinear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) whose decoding steps take `decode_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return decode_linear(x, self.weight, self.bias)


def parts_fit(x: Tensor, weights: list[Tensor], biases: list[Tensor | None]) -> bool:
    """Whether `linear_parts` runs on the row kernel: where each part alone would (`fits`), so
    that its values are those of the separate calls."""
    return all(fits(x, w, b) for w, b in zip(weights, biases, strict=True))


def linear_parts(x: Tensor, weights: list[Tensor], biases: list[Tensor | None]) -> Tensor:
    """[decode_linear(x, w_1, b_1) | decode_linear(x, w_2, b_2) | ...] bit for bit in one call of
    the row kernel (where `parts_fit`): the weights read where they lie, one hand-off between
    threads for all of them."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.moekit.rows_linear_parts(flat, weights, biases, torch.get_num_threads())
    return out.view(*x.shape[:-1], out.shape[-1])
