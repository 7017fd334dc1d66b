"""Matrix products through the fastest CPU kernel torch ships: oneDNN or MKL, probed once.

torch's `mm` calls MKL. On some CPUs MKL does not use the wide vector units it could: on the
AMD EPYC (AVX-512) of the development machine its fp32 GEMMs reach ~110 GFLOP/s per core, while
oneDNN's (the library behind `torch.ops.mkldnn._linear_pointwise`, which torch's own compiler
uses for CPU linear layers) reach ~250 on the same shapes (BENCHMARKS.md). Which one is faster
depends on the machine, so the first product of each dtype times both on a representative shape
and keeps the winner for the life of the process; `MOEKIT_GEMM=mkl|onednn` forces a choice.
The oneDNN op is private to torch: every result is checked against `torch.mm` in the probe, and
any failure falls back to `torch.mm`.
"""

from __future__ import annotations

import os
import time
from functools import cache

import torch
from torch import Tensor

KERNELS = ("auto", "mkl", "onednn")
PROBE_SHAPE = (256, 512, 512)  # rows, in, out: an expert-sized GEMM
# Below this many rows MKL is as fast or faster (measured: 1-4 rows of 512 x 512, decode).
ONEDNN_MIN_ROWS = 8


def _onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T with oneDNN (x [M, K], weight [N, K], any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def _median_seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@cache
def onednn_is_faster(dtype: torch.dtype) -> bool:
    """Whether products of `dtype` go through oneDNN in this process (probed once per dtype)."""
    choice = os.environ.get("MOEKIT_GEMM", "auto").lower()
    if choice not in KERNELS:
        choice = "auto"
    if choice == "mkl" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    rows, k, n = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    try:
        ours = _onednn_linear(x, w)
        checks = (_onednn_linear(x, w.t().contiguous().t()), _onednn_linear(x.t().contiguous().t(), w))
    except RuntimeError:
        return False
    expected = torch.mm(x.float(), w.float().t())
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for result in (ours, *checks):
        close = torch.allclose(result.float(), expected, rtol=tolerance, atol=tolerance)
        if result.shape != expected.shape or not close:
            return False
    if choice == "onednn":
        return True
    onednn = _median_seconds(lambda: _onednn_linear(x, w))
    mkl = _median_seconds(lambda: torch.mm(x, w.t()))
    return onednn < 0.9 * mkl


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T for 2-D x [M, K] and weight [N, K] (any strides)."""
    if x.shape[0] >= ONEDNN_MIN_ROWS and onednn_is_faster(x.dtype):
        return _onednn_linear(x, weight)
    return torch.mm(x, weight.t())


def linear_into(out: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """out[...] = x @ weight.T, with `out` a preallocated [M, N] view."""
    if x.shape[0] >= ONEDNN_MIN_ROWS and onednn_is_faster(x.dtype):
        out.copy_(_onednn_linear(x, weight))
        return out
    return torch.mm(x, weight.t(), out=out)
