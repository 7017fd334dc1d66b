"""Whole-expert tasks for the worker path: an expert's gather, both products, activation and
routing weight (forward), and its whole backward, each run as one task while its rows are in cache.

Why: otherwise the gathers, activations and their derivatives stream full-size tensors through
memory between the per-expert products, and every product is copied into a shared buffer. Here
the only full-size passes left are the combine (`index_add_` on the calling thread, in a fixed
order, so results do not depend on which worker ran which expert) and the packed weight
gradients. It pays off for large experts only (`grouped.fused_pays_off`): an expert task runs some
twenty small ops, and for many small experts their dispatch, on two threads at once, queues on
the interpreter lock.

On the library kernels, each expert's rows are padded with zero rows up to the GEMM kernel's row
bucket, so every product is a single oneDNN call of a shape it has compiled; zero input and zero
upstream-gradient rows contribute exactly nothing to the weight gradients, and the padded outputs
are dropped. (Where moekit's own kernel runs, its C++ loops take the experts whole instead.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.dispatch.workers import for_each_expert
from moekit.experts.activations import Activation
from moekit.kernels.gemm import linear_parts, padded_rows, weight_grad


@dataclass
class ExpertRows:
    """What one expert's forward keeps for its backward ([padded rows, ...], pad rows last)."""

    x_in: Tensor  # gathered input (times the routing weight when it applies to the input), pad 0
    h: Tensor  # first projection (+ bias)
    a: Tensor  # activation
    a_in: Tensor  # input of the second projection (times the routing weight on the output), pad 0


def _product(rows: Tensor, weight: Tensor) -> Tensor:
    """rows @ weight.T in the fewest library kernel calls (one unless rows exceed a chunk)."""
    parts = linear_parts(rows, weight)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _weight_grad_into(out: Tensor, grad_rows: Tensor, in_rows: Tensor) -> None:
    """out = grad_rows.T @ in_rows, copied in."""
    out.copy_(weight_grad(grad_rows, in_rows))


def _gather_padded(source: Tensor, index: Tensor, rows: int) -> Tensor:
    """source[index] followed by zero rows up to `rows` rows."""
    out = source.new_empty(rows, source.shape[1])
    torch.index_select(source, 0, index, out=out[: len(index)])
    out[len(index) :].zero_()
    return out


def _scaled_padded(values: Tensor, scale: Tensor) -> Tensor:
    """values * scale on the first len(scale) rows, zero on the pad rows."""
    out = torch.empty_like(values)
    count = scale.shape[0]
    torch.mul(values[:count], scale, out=out[:count])
    out[count:].zero_()
    return out


@dataclass(frozen=True)
class FusedExperts:
    """The forward and backward of the grouped experts as whole-expert tasks on the workers."""

    token: Tensor  # [A] expert-sorted token ids
    nonempty: tuple[tuple[int, int, int], ...]  # (expert, start, end)
    empty_experts: tuple[int, ...]
    activation: Activation
    on_output: bool  # routing weight applied to the expert's output (else to its input)

    def forward(
        self,
        x: Tensor,
        scale: Tensor,
        w_in: Tensor,
        w_out: Tensor,
        b_in: Tensor | None,
        b_out: Tensor | None,
    ) -> tuple[Tensor, dict[int, ExpertRows]]:
        """Output [T, d] and each expert's saved rows; `scale` is the routing weight [A, 1]."""
        ys = x.new_empty(len(self.token), w_out.shape[1])
        saved: dict[int, ExpertRows] = {}

        def run(e: int, s: int, t: int) -> None:
            count, sc = t - s, scale[s:t]
            x_in = _gather_padded(x, self.token[s:t], padded_rows(count, x.dtype))
            if not self.on_output:
                x_in[:count].mul_(sc)
            h = _product(x_in, w_in[e])
            if b_in is not None:
                h += b_in[e]
            a = self.activation.forward(h)
            a_in = _scaled_padded(a, sc) if self.on_output else a
            y = _product(a_in, w_out[e])[:count]
            if b_out is not None:
                y += b_out[e] * sc if self.on_output else b_out[e]
            ys[s:t] = y
            saved[e] = ExpertRows(x_in, h, a, a_in)

        for_each_expert(self.nonempty, run, parallel=True)
        return torch.zeros_like(x).index_add_(0, self.token, ys), saved

    def backward(
        self,
        grad_out: Tensor,
        x: Tensor,
        scale: Tensor,
        saved: dict[int, ExpertRows],
        w_in: Tensor,
        w_out: Tensor,
        b_out: Tensor | None,
        needs: tuple[bool, ...],
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """Gradients of x, the routing weight [A], w_in, w_out, b_in, b_out (None where `needs`,
        the flags for those six, says they are not wanted)."""
        num_experts = w_in.shape[0]
        grad_out = grad_out.contiguous()
        grad_xs = grad_out.new_empty(len(self.token), w_in.shape[2])
        grad_scale = grad_out.new_empty(len(self.token))
        grad_w_in = packed_grad(w_in.shape, w_in, self.empty_experts) if needs[2] else None
        grad_w_out = packed_grad(w_out.shape, w_out, self.empty_experts) if needs[3] else None
        grad_b_in = grad_out.new_zeros(num_experts, w_in.shape[1]) if needs[4] else None
        grad_b_out = grad_out.new_zeros(num_experts, w_out.shape[1]) if needs[5] else None

        def run(e: int, s: int, t: int) -> None:
            rows, count, sc = saved[e], t - s, scale[s:t]
            grad_y = _gather_padded(grad_out, self.token[s:t], rows.h.shape[0])
            if grad_w_out is not None:
                _weight_grad_into(grad_w_out[e], grad_y, rows.a_in)
            if grad_b_out is not None:
                grad_b_out[e] = (grad_y[:count] * sc).sum(0) if self.on_output else grad_y.sum(0)
            grad_a = _product(grad_y, w_out[e].t())
            if self.on_output:
                dot = torch.linalg.vecdot(grad_a[:count], rows.a[:count])
                if b_out is not None:
                    dot += grad_y[:count] @ b_out[e]
                grad_scale[s:t] = dot
                grad_a[:count].mul_(sc)
            grad_h = self.activation.backward(rows.h, grad_a)
            if grad_w_in is not None:
                _weight_grad_into(grad_w_in[e], grad_h, rows.x_in)
            if grad_b_in is not None:
                grad_b_in[e] = grad_h.sum(0)
            grad_x = _product(grad_h, w_in[e].t())[:count]
            if not self.on_output:  # x_in = x * scale
                grad_scale[s:t] = torch.linalg.vecdot(grad_x, x.index_select(0, self.token[s:t]))
                grad_x = grad_x * sc
            grad_xs[s:t] = grad_x

        for_each_expert(self.nonempty, run, parallel=True)
        grad_x = None
        if needs[0]:
            grad_x = grad_xs.new_zeros(grad_out.shape[0], w_in.shape[2])
            grad_x.index_add_(0, self.token, grad_xs)
        return grad_x, grad_scale, grad_w_in, grad_w_out, grad_b_in, grad_b_out


def packed_grad(shape: torch.Size, like: Tensor, empty_experts: Sequence[int]) -> Tensor:
    """The packed [E, ...] weight gradient that expert tasks copy their slices into; experts that
    received no rows get exactly zero."""
    packed = like.new_empty(shape)
    for e in empty_experts:
        packed[e].zero_()
    return packed
