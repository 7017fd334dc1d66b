"""RMSNorm of a few fp32 rows in one call of moekit's kernel (`csrc/rms_norm.cpp`), where it
gives torch.rms_norm's values bit for bit (`MOEKIT_NATIVE=0` at the first use turns it off with
the other kernels; decided once per process, being the same values either way).

torch's fp32 rms_norm on the CPU runs seven ops, each with its own setup: 15-30 us for a row of
32 to 1024 values (measured on an AVX2 EPYC), several per layer of a decoding step. The kernel
repeats torch's arithmetic in torch's order, including the order in which torch's CPU sum kernel
adds a row; since that order belongs to torch's build, the kernel is used only where a probe at
first use, on rows of every width up to 160 and a few wider ones, finds it equal to torch.rms_norm
bit for bit (else torch's op runs, as it does for large inputs, other dtypes and autograd).
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
