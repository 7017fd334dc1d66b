"""The per-expert product loops of the grouped path, run without the interpreter lock.

Each expert's products take a handful of torch calls (slices, one or two GEMMs, copies into the
layer's buffers). Called from Python, every call lets go of the interpreter lock and takes it back,
and with two worker threads doing so at once they queue on it, the more so when the OS is slow to
wake a waiting thread. The same loops compiled with TorchScript make those calls from C++, where
nothing holds the lock: measured side by side on the layer's fwd+bwd, 6 % faster at 128 experts
of 256 x 128 and 1 % at 64 of 512 x 256, 12 % and 2 % while the OS is slow to wake threads
(BENCHMARKS.md). TorchScript is deprecated in recent torch; where it is missing or cannot compile
these loops, they run as the Python they are written in, with the same results to the bit.

Where moekit's own kernel runs (`moekit.kernels.native`), the loops call it instead: it writes each
product straight into the layer's buffer and each weight gradient into its slice of the packed
gradient, so the loops have no copies and no row cutting. It is single-threaded, so these loops
are for the workers, one core each.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from moekit.kernels.gemm import RowCuts, linear_rows_for, weight_grad_for
from moekit.kernels.native import native_available


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


def native_products_into(
    rows: Tensor,
    weights: Tensor,
    out: Tensor,
    experts: list[int],
    starts: list[int],
    stops: list[int],
    cuts: RowCuts,
) -> None:
    """`products_into` on the native kernel (`cuts` unused: it takes any row count), each product
    pulling the next expert's weights into cache as it runs."""
    for i in range(len(experts)):
        start, stop = starts[i], stops[i]
        upcoming: Tensor | None = None
        if i + 1 < len(experts):
            upcoming = weights[experts[i + 1]]
        torch.ops.moekit.mm_into(rows[start:stop], weights[experts[i]].t(), out[start:stop], upcoming)


def native_backward_pairs_into(
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
    """`backward_pairs_into` on the native kernel (`cuts` unused). The weight gradient's product
    pulls the expert's weights into cache for the input gradient's; without it, the input
    gradient's product pulls the next expert's."""
    for i in range(len(experts)):
        expert, start, stop = experts[i], starts[i], stops[i]
        upcoming: Tensor | None = None
        if grad_weight is not None:
            torch.ops.moekit.mm_into(
                grad_rows[start:stop].t(), in_rows[start:stop], grad_weight[expert], weights[expert]
            )
        elif i + 1 < len(experts):
            upcoming = weights[experts[i + 1]]
        torch.ops.moekit.mm_into(grad_rows[start:stop], weights[expert].t(), grad_in[start:stop], upcoming)


def expert_loops(native: bool = False) -> tuple[Callable[..., None], Callable[..., None]]:
    """(products_into, backward_pairs_into) as this process runs them: on the native kernel when
    asked for (single-threaded callers: the workers) and it runs here, fp32 only; compiled unless
    `MOEKIT_LOOPS=python` (or TorchScript cannot compile them)."""
    compiled = os.environ.get("MOEKIT_LOOPS", "compiled").lower() != "python"
    return _loops(compiled, native and native_available())


@cache
def _loops(compiled: bool, native: bool) -> tuple[Callable[..., None], Callable[..., None]]:
    native_loops = (native_products_into, native_backward_pairs_into)
    return _compiled_if(compiled, native_loops if native else (products_into, backward_pairs_into))


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


# Whole experts on the native kernels: for SwiGLU experts without biases, each expert's gather,
# products, activation and routing weight (forward), and its whole backward, in one compiled loop
# per run of experts, every intermediate written once into the layer's full-size buffers while it
# is in cache. The Python whole-expert tasks (`dispatch/fused.py`) do the same for any expert, but
# run some twenty Python-dispatched ops per expert, which queue on the interpreter lock when the
# experts are small.


def swiglu_experts_forward_into(
    x: Tensor,
    token: Tensor,
    scale: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    xs: Tensor,
    h: Tensor,
    a: Tensor,
    a_in: Tensor,
    ys: Tensor,
    on_output: bool,
    experts: list[int],
    starts: list[int],
    stops: list[int],
) -> None:
    """For each listed expert e and its rows [s, t): xs = x[token], h = (xs or xs * scale) @
    w_in[e].T, a = swiglu(h), a_in = a * scale (routing weight on the output; else a_in is a),
    ys = a_in @ w_out[e].T."""
    for i in range(len(experts)):
        expert, start, stop = experts[i], starts[i], stops[i]
        torch.index_select(x, 0, token[start:stop], out=xs[start:stop])
        x_in = xs[start:stop] if on_output else xs[start:stop] * scale[start:stop]
        torch.ops.moekit.mm_into(x_in, w_in[expert].t(), h[start:stop], w_out[expert])
        torch.ops.moekit.swiglu_into(h[start:stop], a[start:stop])
        if on_output:
            torch.mul(a[start:stop], scale[start:stop], out=a_in[start:stop])
        upcoming: Tensor | None = None
        if i + 1 < len(experts):
            upcoming = w_in[experts[i + 1]]
        torch.ops.moekit.mm_into(a_in[start:stop], w_out[expert].t(), ys[start:stop], upcoming)


def swiglu_experts_backward_into(
    grad_out: Tensor,
    token: Tensor,
    scale: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    xs: Tensor,
    h: Tensor,
    a: Tensor,
    a_in: Tensor,
    grad_w_in: Tensor | None,
    grad_w_out: Tensor | None,
    grad_scale: Tensor,
    grad_xs: Tensor,
    grad_a: Tensor,
    grad_h: Tensor,
    on_output: bool,
    experts: list[int],
    starts: list[int],
    stops: list[int],
) -> None:
    """The backward of `swiglu_experts_forward_into` for each listed expert: its packed weight
    gradients, the gradient of its routing weights (grad_scale [A]) and of its gathered rows
    (grad_xs, combined by the caller); grad_a [A, ff] and grad_h [A, 2 ff] are work space."""
    for i in range(len(experts)):
        expert, start, stop = experts[i], starts[i], stops[i]
        grad_y = grad_out.index_select(0, token[start:stop])
        if grad_w_out is not None:
            torch.ops.moekit.mm_into(grad_y.t(), a_in[start:stop], grad_w_out[expert], w_out[expert])
        torch.ops.moekit.mm_into(grad_y, w_out[expert], grad_a[start:stop], w_in[expert])
        if on_output:
            grad_scale[start:stop] = torch.linalg.vecdot(grad_a[start:stop], a[start:stop])
            grad_a[start:stop].mul_(scale[start:stop])
        torch.ops.moekit.swiglu_backward_into(h[start:stop], grad_a[start:stop], grad_h[start:stop])
        x_in = xs[start:stop] if on_output else xs[start:stop] * scale[start:stop]
        if grad_w_in is not None:
            torch.ops.moekit.mm_into(grad_h[start:stop].t(), x_in, grad_w_in[expert])
        upcoming: Tensor | None = None
        if i + 1 < len(experts):
            upcoming = w_out[experts[i + 1]]
        torch.ops.moekit.mm_into(grad_h[start:stop], w_in[expert], grad_xs[start:stop], upcoming)
        if not on_output:
            grad_scale[start:stop] = torch.linalg.vecdot(grad_xs[start:stop], xs[start:stop])
            grad_xs[start:stop].mul_(scale[start:stop])


def swiglu_expert_loops() -> tuple[Callable[..., None], Callable[..., None]]:
    """(forward, backward) whole-expert loops for SwiGLU experts on the native kernels (only where
    `native_available()`), compiled unless `MOEKIT_LOOPS=python`."""
    compiled = os.environ.get("MOEKIT_LOOPS", "compiled").lower() != "python"
    return _swiglu_loops(compiled)


@cache
def _swiglu_loops(compiled: bool) -> tuple[Callable[..., None], Callable[..., None]]:
    return _compiled_if(compiled, (swiglu_experts_forward_into, swiglu_experts_backward_into))
