"""The per-expert product loops of the grouped path, run without the interpreter lock.

Each expert's products take a handful of torch calls (slices, one or two GEMMs, copies into the
layer's buffers). Called from Python, every call lets go of the interpreter lock and takes it back,
and with two worker threads doing so at once they queue on it, the more so when the OS is slow to
wake a waiting thread. The same loops compiled with TorchScript make those calls from C++, where
nothing holds the lock: measured side by side on the layer's fwd+bwd, 6 % faster at 128 experts
of 256 x 128 and 1 % at 64 of 512 x 256, 12 % and 2 % while the OS is slow to wake threads
(BENCHMARKS.md). TorchScript is deprecated in recent torch; where it is missing or cannot compile
these loops, they run as the Python they are written in, with the same results to the bit.

They run the library kernels (`moekit.kernels.gemm`) on the workers, where moekit's own kernel does
not run (no AVX-512 or compiler, other dtypes, `MOEKIT_NATIVE=0`); where it runs, its C++ loops
over the experts (`moekit.kernels.native`) replace them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from moekit.kernels.gemm import RowCuts, linear_rows_for, weight_grad_for


def products_into(
    rows: Tensor,
    weights: Tensor,
    out: Tensor,
    experts: list[int],
    starts: list[int],
    stops: list[int],
    cuts: RowCuts,
) -> None:
    """out[s:t] = rows[s:t] @ weights[e].T for each listed expert e and its rows [s, t)."""
    for i in range(len(experts)):
        _linear_rows_into(rows, starts[i], stops[i], weights[experts[i]], out, cuts)


def backward_pairs_into(
    grad_rows: Tensor,
    in_rows: Tensor,
    weights: Tensor,
    grad_weight: Tensor | None,
    grad_in: Tensor,
    experts: list[int],
    starts: list[int],
    stops: list[int],
    cuts: RowCuts,
) -> None:
    """For each listed expert e and its rows [s, t), both products of a projection's backward,
    reading the gradient rows once while they are in cache: grad_weight[e] = grad_rows[s:t]^T @
    in_rows[s:t] (when a weight gradient is wanted) and grad_in[s:t] = grad_rows[s:t] @ weights[e].T."""
    for i in range(len(experts)):
        expert, start, stop = experts[i], starts[i], stops[i]
        if grad_weight is not None:
            grad_weight[expert].copy_(weight_grad_for(grad_rows[start:stop], in_rows[start:stop], cuts))
        _linear_rows_into(grad_rows, start, stop, weights[expert], grad_in, cuts)


def _linear_rows_into(
    rows: Tensor, start: int, stop: int, weight: Tensor, out: Tensor, cuts: RowCuts
) -> None:
    """out[start:stop] = rows[start:stop] @ weight.T, each block copied in while it is in cache."""
    for block in linear_rows_for(rows, start, stop, weight, cuts):
        out[start : start + block.shape[0]].copy_(block)
        start += block.shape[0]


def expert_loops() -> tuple[Callable[..., None], Callable[..., None]]:
    """(products_into, backward_pairs_into) as this process runs them: compiled unless
    `MOEKIT_LOOPS=python` (or TorchScript cannot compile them)."""
    compiled = os.environ.get("MOEKIT_LOOPS", "compiled").lower() != "python"
    return _loops(compiled)


@cache
def _loops(compiled: bool) -> tuple[Callable[..., None], Callable[..., None]]:
    return _compiled_if(compiled, (products_into, backward_pairs_into))


def _compiled_if(
    compiled: bool, loops: tuple[Callable[..., None], Callable[..., None]]
) -> tuple[Callable[..., None], Callable[..., None]]:
    """The loops compiled with TorchScript if asked and it can, else as they are."""
    if compiled:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.script(loops[0]), torch.jit.script(loops[1])
        except Exception as error:  # TorchScript removed, or unable to compile: the Python loops are exact
            warnings.warn(
                f"moekit: TorchScript could not compile the expert loops ({type(error).__name__}: {error}); "
                "running them as Python loops (same results, slower)",
                RuntimeWarning,
                stacklevel=3,
            )
    return loops
