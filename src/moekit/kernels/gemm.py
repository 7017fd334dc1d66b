"""Matrix products through the fastest CPU kernel torch ships: oneDNN or MKL, probed once.

torch's `mm` calls MKL. On some CPUs MKL does not use the wide vector units it could: on the
AMD EPYC (AVX-512) of the development machine its fp32 GEMMs reach ~110 GFLOP/s per core, while
oneDNN's (the library behind `torch.ops.mkldnn._linear_pointwise`, which torch's own compiler
uses for CPU linear layers) reach ~250 on the same shapes (BENCHMARKS.md). Which one is faster
depends on the machine, so both are timed on a representative shape once per machine and dtype,
and the winner is stored (`moekit.kernels.store`): the two round differently, and a choice made by
timing in every process would let the machine's load change a run's losses. `MOEKIT_GEMM=mkl|onednn`
forces a choice, `MOEKIT_GEMM=float32=onednn,bfloat16=mkl` one per dtype (how a resumed run
re-applies the kernels recorded in its checkpoint, `moekit.kernels.record`).
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
# A oneDNN call costs ~10 us more than an MKL one, which a fixed-shape product earns back only
# above about this many multiply-adds (measured, 2 threads: a router's 8 x 256 x 128 product 15 us
# on oneDNN against 8 on MKL, level at 64 x 256 x 128, 30 against 42 at 128 x 256 x 128; a decode
# step's 8 x 256 x 2048 already 52 against 93).
ONEDNN_MIN_MACS = 2**22


def _onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T with oneDNN (x [M, K], weight [N, K], any strides)."""
    no_scalars: list[float | None] = []
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", no_scalars, "")


def _onednn_weight_grad(grad_rows: Tensor, in_rows: Tensor) -> Tensor:
    """grad_rows.T @ in_rows with oneDNN, the narrower operand as its source rows (measured up to
    1.9x faster than the other orientation for M=4096 rows, 1024 x 128); may return a transposed view."""
    if grad_rows.shape[1] > in_rows.shape[1]:
        return _onednn_linear(in_rows.t(), grad_rows.t()).t()
    return _onednn_linear(grad_rows.t(), in_rows.t())


def _median_seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def requested_kernel(dtype: torch.dtype) -> str:
    """What `MOEKIT_GEMM` asks for `dtype`: "auto", "mkl" or "onednn" (unknown values: "auto")."""
    setting = os.environ.get("MOEKIT_GEMM", "auto").strip().lower()
    dtype_name = str(dtype).removeprefix("torch.")
    if "=" in setting:
        per_dtype = dict(part.split("=", 1) for part in setting.split(",") if "=" in part)
        setting = per_dtype.get(dtype_name, "auto").strip()
    return setting if setting in KERNELS else "auto"


def gemm_kernel(dtype: torch.dtype) -> str:
    """ "onednn" or "mkl": the kernel products of `dtype` take in this process."""
    return "onednn" if onednn_is_faster(dtype) else "mkl"


@cache
def onednn_is_faster(dtype: torch.dtype) -> bool:
    """Whether products of `dtype` go through oneDNN in this process: as `MOEKIT_GEMM` asks, else
    as measured once on this machine and stored; never where oneDNN fails the probe. The first
    call may come under bf16 autocast, which must not recast the probe's reference product."""
    with torch.autocast("cpu", enabled=False):
        return _probe_onednn(dtype)


def _probe_onednn(dtype: torch.dtype) -> bool:
    choice = requested_kernel(dtype)
    if choice == "mkl" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not _onednn_matches_mm(dtype):
        return False
    if choice == "onednn":
        return True
    from moekit.kernels.store import stored_choice

    name = f"gemm-{str(dtype).removeprefix('torch.')}"
    # measured only under load (every attempt disturbed): torch's own MKL
    return stored_choice(name, ("mkl", "onednn"), lambda: _measure_faster(dtype), disturbed="mkl") == "onednn"


def _probe_operands(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    rows, k, n = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    return x, w


def _onednn_matches_mm(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    x, w = _probe_operands(dtype)
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
    return True


# Rounds of the one-off measurement: the median over rounds in which both kernels run back to
# back, so that load on the machine slows both alike.
MEASURE_ROUNDS = 15


def _measure_faster(dtype: torch.dtype) -> str:
    """ "onednn" if it is at least 10 % faster than MKL on the probe shape, else "mkl"."""
    x, w = _probe_operands(dtype)
    ratios = []
    for _ in range(MEASURE_ROUNDS):
        onednn = _median_seconds(lambda: _onednn_linear(x, w), repeats=3)
        mkl = _median_seconds(lambda: torch.mm(x, w.t()), repeats=3)
        ratios.append(onednn / mkl)
    return "onednn" if sorted(ratios)[len(ratios) // 2] < 0.9 else "mkl"


def dense_onednn_pays_off(rows: int, inner: int, outer: int, dtype: torch.dtype) -> bool:
    """Whether a fixed-shape product of rows x inner x outer should go to oneDNN rather than MKL."""
    return rows >= ONEDNN_MIN_ROWS and rows * inner * outer >= ONEDNN_MIN_MACS and onednn_is_faster(dtype)


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T for 2-D x [M, K] and weight [N, K] (any strides), in one product: for the
    fixed-shape products of dense layers (the experts' varying row counts run in
    `moekit.dispatch.grouped`'s expert loops)."""
    if dense_onednn_pays_off(x.shape[0], x.shape[1], weight.shape[0], x.dtype):
        return _onednn_linear(x, weight)
    return torch.mm(x, weight.t())


def dense_weight_grad(grad_rows: Tensor, in_rows: Tensor) -> Tensor:
    """grad_rows.T @ in_rows for a fixed-shape dense layer, in one product; contiguous."""
    if dense_onednn_pays_off(grad_rows.shape[0], grad_rows.shape[1], in_rows.shape[1], grad_rows.dtype):
        return _onednn_weight_grad(grad_rows, in_rows).contiguous()
    return torch.mm(grad_rows.t(), in_rows)
