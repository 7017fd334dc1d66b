"""moekit's own expert GEMM against oneDNN, one core, on the layer's expert-sized products.

Each product of a projection's forward (x @ W^T), input gradient (g @ W) and weight gradient
(g^T @ x), for the per-expert row counts of the layer benchmark's shapes, timed side by side in
one process, interleaved call by call: `native` writes into a preallocated output, `onednn`
returns a new tensor (as it must). Reports GFLOP/s, hot caches (the same operands every round),
median of the rounds.

    .venv/bin/python benchmarks/native_kernel.py --repeats 200
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from moekit.bench.timing import interleaved_medians
from moekit.kernels.gemm import _onednn_linear
from moekit.kernels.native import mm_into, native_available

# (name, rows per expert, inner, outer) of the first and second projections at T=2048
SHAPES = (
    ("coarse w_in", 512, 512, 2048),
    ("coarse w_out", 512, 1024, 512),
    ("fine w_in", 192, 512, 512),
    ("fine w_out", 192, 256, 512),
    ("very fine w_in", 128, 256, 256),
    ("very fine w_out", 128, 128, 256),
)


def _timed(fn) -> Callable[[], float]:
    def step() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    if not native_available():
        raise SystemExit("the native kernel does not run here (no AVX-512 CPU or no C++ compiler)")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print(f"GFLOP/s on one core, median of {args.repeats} calls (hot caches)")
    print(f"{'product':>16} {'rows x in x out':>18} {'layout':>12} {'native':>8} {'onednn':>8}")
    for name, rows, inner, outer in SHAPES:
        for layout, rates in _layout_rates(rows, inner, outer, args.repeats, gen).items():
            size = f"{rows} x {inner} x {outer}"
            print(f"{name:>16} {size:>18} {layout:>12} {rates[0]:8.0f} {rates[1]:8.0f}")


def _layout_rates(rows: int, inner: int, outer: int, repeats: int, gen: torch.Generator) -> dict:
    """{layout: (native GFLOP/s, oneDNN GFLOP/s)} for one projection's three products."""
    x = torch.randn(rows, inner, generator=gen)
    weight = torch.randn(outer, inner, generator=gen)
    grad = torch.randn(rows, outer, generator=gen)
    out, grad_in, grad_w = torch.empty(rows, outer), torch.empty(rows, inner), torch.empty(outer, inner)
    cases = {
        "forward": (lambda: mm_into(x, weight.t(), out), lambda: _onednn_linear(x, weight)),
        "input grad": (lambda: mm_into(grad, weight, grad_in), lambda: _onednn_linear(grad, weight.t())),
        "weight grad": (lambda: mm_into(grad.t(), x, grad_w), lambda: _onednn_linear(grad.t(), x.t())),
    }
    flops = 2 * rows * inner * outer
    rates = {}
    for layout, (native, onednn) in cases.items():
        steps = {"native": _timed(native), "onednn": _timed(onednn)}
        medians = interleaved_medians(steps, repeats, warmup=max(3, repeats // 10))
        rates[layout] = (flops / medians["native"] / 1e9, flops / medians["onednn"] / 1e9)
    return rates


if __name__ == "__main__":
    main()
