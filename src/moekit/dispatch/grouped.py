"""Grouped expert compute with its own autograd, on one of three paths.

Why its own backward: slicing a packed [E, ...] parameter per expert and letting autograd run
makes every backward step materialise a full-size weight gradient per expert (10-20x slower than
the dense GEMM of the same FLOPs at 64+ experts). Here each expert's weight gradient is one GEMM
written straight into its slice of the packed gradient, and the routing weight is folded into the
smaller of the two activations so that the combine is a single sum per token.

The layer's arithmetic (gather, products, activation, routing weight, combine, and their
gradients) is written once, in `GroupedExperts`; only the expert products (and, for whole SwiGLU
experts, the expert itself) differ between paths.
Each path is an `ExpertProducts`, and `choose_products` is the one place that picks it:

- `native` (many tokens): moekit's own AVX-512 fp32 kernel (`moekit.kernels.native`), every
  expert whole on one of torch's threads, the threads taking experts largest first from a shared
  counter inside one C++ call: no hand-off per expert, no interpreter lock, and a thread slowed by
  other work on its core leaves the remaining experts to the others. SwiGLU experts without
  biases (routing weight on the output) run whole in that call, gather, products, activation and
  routing weight while the expert's rows are in cache (`NativeProducts.swiglu_forward`); other
  experts run their two products there with the activation in between.
- `decode` (fewer than DECODE_ROWS_PER_EXPERT rows per active expert): the same kernel's dot
  products, which read each chosen expert's weights once; bound by memory bandwidth, so on all
  threads only where split reads were measured faster on this CPU model (`dispatch.bandwidth`).
- `portable` (bf16/fp16 under autocast, float64, CPUs without AVX-512 or a compiler, GPUs,
  `MOEKIT_NATIVE=0`, or `backend` "grouped_mm"/"loop"): torch's `grouped_mm` where its dtype and
  16-byte strides allow, else one `torch.mm` per expert.

Under autocast (bf16 mixed precision) the experts run in the autocast dtype with fp32 routing
weights, their gradients flowing back to the fp32 weights.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.device import autocast_dtype, no_autocast
from moekit.dispatch.bandwidth import decode_threads, single_threaded
from moekit.experts.activations import Activation
from moekit.kernels.native import native_fits

BACKENDS = ("auto", "loop", "grouped_mm")
PATHS = ("native", "decode", "portable")
# With fewer rows than this per active expert, a step reads each expert's weights for a row or
# two: the kernel's dot products, bound by memory bandwidth rather than arithmetic.
DECODE_ROWS_PER_EXPERT = 4
# Rough single-core rates that generation uses to decide whether a step's products are worth a
# second thread (`moekit.inference.generate.threads_pay_off`); the expert paths do not use them.
CORE_FLOPS_PER_S = 100e9
CORE_BYTES_PER_S = 10e9
MIN_SHARE_SECONDS = 100e-6


@dataclass(frozen=True)
class ExpertGroups:
    """Expert-sorted assignments laid out for compute: rows [offsets[e], offsets[e+1]) go to e."""

    token: Tensor  # [A] int64
    expert: Tensor  # [A] int64
    counts: tuple[int, ...]  # per expert, on the host
    num_tokens: int = 0  # rows of the layer's input (for the combine)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        starts = [0]
        for c in self.counts:
            starts.append(starts[-1] + c)
        return tuple(starts)

    @cached_property
    def grouped_mm_offsets(self) -> Tensor:
        return torch.tensor(self.offsets[1:], dtype=torch.int32, device=self.token.device)

    @cached_property
    def empty_experts(self) -> list[int]:
        return [e for e, c in enumerate(self.counts) if not c]

    @cached_property
    def nonempty(self) -> tuple[tuple[int, int, int], ...]:
        """(expert, start, end) for every expert with rows."""
        offsets = self.offsets
        return tuple((e, offsets[e], offsets[e + 1]) for e, c in enumerate(self.counts) if c)

    @cached_property
    def by_token(self) -> tuple[Tensor, Tensor]:
        """(order, bounds): the assignments sorted by token, in their own order within a token
        (order [A]), token t's being order[bounds[t]:bounds[t+1]]; for the combine."""
        order = torch.argsort(self.token, stable=True)
        counts = torch.bincount(self.token, minlength=self.num_tokens)
        bounds = torch.zeros(self.num_tokens + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=bounds[1:])
        return order, bounds

    @staticmethod
    def build(token: Tensor, expert: Tensor, num_experts: int, num_tokens: int = 0) -> ExpertGroups:
        counts = torch.bincount(expert, minlength=num_experts)[:num_experts]
        return ExpertGroups(token, expert, tuple(counts.tolist()), num_tokens)


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


def choose_backend(requested: str, dtype: torch.dtype, hidden: int, in_features: int, ff: int) -> str:
    """The portable path's products: grouped_mm where it runs (dtype, 16-byte strides) and is not
    refused (`loop`), else one torch.mm per expert ("loop")."""
    if requested == "loop":
        return "loop"
    aligned = all((n * dtype.itemsize) % 16 == 0 for n in (hidden, in_features, ff))
    usable = grouped_mm_available() and dtype in (torch.float32, torch.bfloat16, torch.float16) and aligned
    return "grouped_mm" if usable else "loop"


def packed_grad(shape: torch.Size, like: Tensor, empty_experts: list[int]) -> Tensor:
    """A packed [E, ...] weight gradient for products to write their slices into; experts that
    received no rows get exactly zero."""
    packed = like.new_empty(shape)
    if empty_experts:  # in one call: one per expert cost a thread hand-off each (decode: ~100 experts)
        packed.index_fill_(0, torch.tensor(empty_experts, device=packed.device), 0)
    return packed


class ExpertProducts(Protocol):
    """The products of one path, over the experts' expert-sorted rows (`ExpertGroups`), for a
    packed `weight` [E, n_out, n_in]."""

    name: str

    def products(self, rows: Tensor, weight: Tensor) -> Tensor:
        """out[rows of e] = rows[rows of e] @ weight[e].T."""
        ...

    def backward_pair(
        self, grad_rows: Tensor, in_rows: Tensor, weight: Tensor, weight_grad_needed: bool
    ) -> tuple[Tensor | None, Tensor]:
        """The packed weight gradient (slice e = grad_rows[e]^T @ in_rows[e], zero for experts
        without rows; None unless needed) and the input rows' gradient (grad_rows[e] @ weight[e])."""
        ...

    def combine(self, rows: Tensor) -> Tensor:
        """out [num_tokens, d]: out[t] = the sum of the rows of t's assignments, in their order."""
        ...


@dataclass(frozen=True)
class NativeProducts:
    """`native` and `decode`: one C++ call per product over all experts on `threads` threads
    (the backward on `backward_threads`)."""

    groups: ExpertGroups
    name: str  # "native" | "decode"
    threads: int
    backward_threads: int = 0  # 0: as `threads`

    @cached_property
    def tasks(self) -> Tensor:
        return torch.tensor(self.groups.nonempty, dtype=torch.long).reshape(-1, 3)

    def products(self, rows: Tensor, weight: Tensor) -> Tensor:
        rows = rows.contiguous()
        out = rows.new_empty(rows.shape[0], weight.shape[1])
        torch.ops.moekit.expert_products(rows, weight, out, self.tasks, self.threads)
        return out

    def backward_pair(
        self, grad_rows: Tensor, in_rows: Tensor, weight: Tensor, weight_grad_needed: bool
    ) -> tuple[Tensor | None, Tensor]:
        grad_rows, in_rows = grad_rows.contiguous(), in_rows.contiguous()
        grad_weight = (
            packed_grad(weight.shape, weight, self.groups.empty_experts) if weight_grad_needed else None
        )
        grad_in = grad_rows.new_empty(grad_rows.shape[0], weight.shape[2])
        torch.ops.moekit.expert_backward_pairs(
            grad_rows,
            in_rows,
            weight,
            grad_weight,
            grad_in,
            self.tasks,
            self.backward_threads or self.threads,
        )
        return grad_weight, grad_in

    def swiglu_forward(self, x: Tensor, scale: Tensor, w_in: Tensor, w_out: Tensor) -> tuple[Tensor, ...]:
        """SwiGLU experts without biases, routing weight on the output, whole in one C++ call:
        each expert's gather, products, activation and routing weight while its rows are in
        cache (unfused, these stream full-size tensors through memory between the products).
        Returns (ys, xs, h, a, a_in): the rows' outputs and what the backward needs."""
        rows, ff = len(self.groups.token), w_out.shape[2]
        xs, ys = x.new_empty(rows, x.shape[1]), x.new_empty(rows, x.shape[1])
        h, a, a_in = x.new_empty(rows, 2 * ff), x.new_empty(rows, ff), x.new_empty(rows, ff)
        torch.ops.moekit.expert_swiglu_forward(
            x.contiguous(),
            self.groups.token,
            scale,
            w_in,
            w_out,
            xs,
            h,
            a,
            a_in,
            ys,
            self.tasks,
            self.threads,
        )
        return ys, xs, h, a, a_in

    def swiglu_backward(
        self, grad_out: Tensor, scale: Tensor, w_in: Tensor, w_out: Tensor, saved: tuple[Tensor, ...], needs
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """The backward of `swiglu_forward`: (grad_xs, grad_scale, grad_w_in, grad_w_out)."""
        xs, h, a, a_in = saved
        empty = self.groups.empty_experts
        grad_w_in = packed_grad(w_in.shape, w_in, empty) if needs[0] else None
        grad_w_out = packed_grad(w_out.shape, w_out, empty) if needs[1] else None
        grad_scale = scale.new_empty(len(scale))
        grad_ys, grad_xs = torch.empty_like(xs), torch.empty_like(xs)
        grad_a, grad_h = torch.empty_like(a), torch.empty_like(h)
        torch.ops.moekit.expert_swiglu_backward(
            grad_out.contiguous(), self.groups.token.contiguous(), scale, w_in, w_out, xs, h, a, a_in,
            grad_w_in, grad_w_out, grad_scale, grad_ys, grad_a, grad_h, grad_xs, self.tasks,
            self.backward_threads or self.threads,
        )  # fmt: skip
        return grad_xs, grad_scale, grad_w_in, grad_w_out

    def combine(self, rows: Tensor) -> Tensor:
        """One pass, each token's sum on one thread: torch's index_add_ on the CPU was measured
        ~10x slower on two threads than on one (2048 tokens x 8 rows of 256: 260 ms, 23 ms)."""
        out = rows.new_empty(self.groups.num_tokens, rows.shape[1])
        torch.ops.moekit.combine_rows(rows.contiguous(), *self.groups.by_token, out)
        return out


@dataclass(frozen=True)
class PortableProducts:
    """`portable`: torch's grouped_mm (`backend` "grouped_mm"), else one torch.mm per expert."""

    groups: ExpertGroups
    backend: str  # "grouped_mm" | "loop"
    name: str = "portable"

    def products(self, rows: Tensor, weight: Tensor) -> Tensor:
        return self._times(rows, weight.transpose(1, 2))

    def backward_pair(
        self, grad_rows: Tensor, in_rows: Tensor, weight: Tensor, weight_grad_needed: bool
    ) -> tuple[Tensor | None, Tensor]:
        grad_weight = None
        if weight_grad_needed and self.backend == "grouped_mm":
            grad_weight = F.grouped_mm(grad_rows.t(), in_rows, offs=self.groups.grouped_mm_offsets)
        elif weight_grad_needed:
            grad_weight = packed_grad(weight.shape, grad_rows, self.groups.empty_experts)
            for e, start, stop in self.groups.nonempty:
                torch.mm(grad_rows[start:stop].t(), in_rows[start:stop], out=grad_weight[e])
        return grad_weight, self._times(grad_rows, weight)

    def combine(self, rows: Tensor) -> Tensor:
        """index_add_, on one thread on the CPU (see `NativeProducts.combine`)."""
        out = rows.new_zeros(self.groups.num_tokens, rows.shape[1])
        with single_threaded() if rows.device.type == "cpu" else nullcontext():
            return out.index_add_(0, self.groups.token, rows)

    def _times(self, rows: Tensor, right: Tensor) -> Tensor:
        """out[rows of e] = rows[rows of e] @ right[e] for `right` [E, n_in, n_out]."""
        if self.backend == "grouped_mm":
            return F.grouped_mm(rows, right, offs=self.groups.grouped_mm_offsets)
        out = rows.new_empty(rows.shape[0], right.shape[2])
        for e, start, stop in self.groups.nonempty:
            torch.mm(rows[start:stop], right[e], out=out[start:stop])
        return out


def choose_products(
    x: Tensor, groups: ExpertGroups, w_in: Tensor, w_out: Tensor, backend: str = "auto"
) -> ExpertProducts:
    """The path for these inputs (see the module docstring)."""
    if backend == "auto" and native_fits(x, w_in, w_out):
        active = len(groups.nonempty)
        if len(groups.token) < DECODE_ROWS_PER_EXPERT * max(1, active):
            # the backward of a decode-sized step (fine-tuning on few tokens) writes every active
            # expert's whole weight gradient, more work than its forward's reads: all threads
            return NativeProducts(groups, "decode", decode_threads(), torch.get_num_threads())
        return NativeProducts(groups, "native", torch.get_num_threads())
    _, in_features, hidden = w_in.shape
    return PortableProducts(groups, choose_backend(backend, x.dtype, hidden, in_features, w_out.shape[2]))


def _bias_grad(grad_rows: Tensor, groups: ExpertGroups, num_experts: int) -> Tensor:
    out = grad_rows.new_zeros(num_experts, grad_rows.shape[1])
    return out.index_add_(0, groups.expert, grad_rows)


@dataclass(frozen=True)
class ExpertPlan:
    """Everything non-differentiable the grouped function needs."""

    groups: ExpertGroups
    activation: Activation
    weight_on: str  # "output" | "input"
    products: ExpertProducts

    @property
    def path(self) -> str:
        return self.products.name

    def whole_swiglu(self, b_in: Tensor | None, b_out: Tensor | None) -> bool:
        """Whether the experts run whole in C++ (`NativeProducts.swiglu_forward`): SwiGLU experts
        without biases, the routing weight on their output, on the native or decode path."""
        whole = isinstance(self.products, NativeProducts) and self.activation.name == "swiglu"
        return whole and self.weight_on == "output" and b_in is None and b_out is None


def _scale(weight: Tensor, x: Tensor) -> Tensor:
    """The routing weights as a column [A, 1] in the activations' dtype."""
    return weight.to(x.dtype).unsqueeze(1)


class GroupedExperts(torch.autograd.Function):
    """y[t] = sum over kept assignments (t, e, w) of w * expert_e(x[t]) (or expert_e(w * x[t]))."""

    @staticmethod
    def forward(ctx, x, weight, w_in, w_out, b_in, b_out, plan: ExpertPlan):
        ctx.plan = plan
        ctx.has_bias = (b_in is not None, b_out is not None)
        groups, act, products = plan.groups, plan.activation, plan.products
        ctx.whole_swiglu = plan.whole_swiglu(b_in, b_out)
        if ctx.whole_swiglu:
            scale = weight.to(x.dtype).contiguous()
            ys, *saved = products.swiglu_forward(x, scale, w_in, w_out)
            ctx.save_for_backward(weight, scale, w_in, w_out, *saved)
            return products.combine(ys)
        scale = _scale(weight, x)
        xs = x.index_select(0, groups.token)
        xs_in = xs * scale if plan.weight_on == "input" else xs
        h = products.products(xs_in, w_in)
        if b_in is not None:
            h += b_in.index_select(0, groups.expert)
        a = act.forward(h)
        a_in = a * scale if plan.weight_on == "output" else a
        ys = products.products(a_in, w_out)
        if b_out is not None:
            bias_rows = b_out.index_select(0, groups.expert)
            ys += bias_rows * scale if plan.weight_on == "output" else bias_rows
        out = products.combine(ys)
        ctx.save_for_backward(xs, weight, w_in, w_out, b_out, h, a, a_in)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        plan: ExpertPlan = ctx.plan
        if ctx.whole_swiglu:
            weight, scale, w_in, w_out, *saved = ctx.saved_tensors
            needs = ctx.needs_input_grad
            grad_xs, grad_scale, grad_w_in, grad_w_out = plan.products.swiglu_backward(
                grad_out, scale, w_in, w_out, saved, (needs[2], needs[3])
            )
            grad_weight = grad_scale.to(weight.dtype) if needs[1] else None
            return plan.products.combine(grad_xs), grad_weight, grad_w_in, grad_w_out, None, None, None
        xs, weight, w_in, w_out, b_out, h, a, a_in = ctx.saved_tensors
        groups, act, products = plan.groups, plan.activation, plan.products
        needs = ctx.needs_input_grad
        num_experts = w_in.shape[0]
        scale = _scale(weight, xs)
        on_output = plan.weight_on == "output"

        grad_ys = grad_out.contiguous().index_select(0, groups.token)
        grad_w_out, grad_a_in = products.backward_pair(grad_ys, a_in, w_out, needs[3])
        grad_weight = None
        if on_output:
            grad_weight = torch.linalg.vecdot(grad_a_in, a)
            if b_out is not None:
                grad_weight += torch.linalg.vecdot(grad_ys, b_out.index_select(0, groups.expert))
            grad_a = grad_a_in.mul_(scale)
        else:
            grad_a = grad_a_in
        grad_b_out = None
        if ctx.has_bias[1] and needs[5]:
            grad_b_out = _bias_grad(grad_ys * scale if on_output else grad_ys, groups, num_experts)

        grad_h = act.backward(h, grad_a)
        xs_in = xs if on_output else xs * scale
        grad_w_in, grad_xs = products.backward_pair(grad_h, xs_in, w_in, needs[2])
        grad_b_in = _bias_grad(grad_h, groups, num_experts) if ctx.has_bias[0] and needs[4] else None
        if not on_output:
            grad_weight = torch.linalg.vecdot(grad_xs, xs)
            grad_xs.mul_(scale)
        grad_x = products.combine(grad_xs)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None


def plan_experts(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: Activation,
    weight_on: str = "output",
    backend: str = "auto",
) -> ExpertPlan:
    """How the kept assignments (expert-sorted `token`, `expert`) will be computed."""
    groups = ExpertGroups.build(token, expert, w_in.shape[0], x.shape[0])
    return ExpertPlan(groups, activation, weight_on, choose_products(x, groups, w_in, w_out, backend))


def grouped_experts(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    weight: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: Activation,
    weight_on: str = "output",
    backend: str = "auto",
) -> Tensor:
    """Run the kept assignments (expert-sorted `token`, `expert`, `weight`) through packed experts.
    Under autocast, in its dtype: the fp32 weights are cast as autocast casts a linear layer's."""
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, w_in, w_out = x.to(dtype), w_in.to(dtype), w_out.to(dtype)
        b_in = None if b_in is None else b_in.to(dtype)
        b_out = None if b_out is None else b_out.to(dtype)
    plan = plan_experts(x, token, expert, w_in, w_out, activation, weight_on, backend)
    with no_autocast(x) if dtype is not None else nullcontext():
        return GroupedExperts.apply(x, weight, w_in, w_out, b_in, b_out, plan)
