"""Grouped expert compute with its own autograd.

Why its own backward: slicing a packed [E, ...] parameter per expert and letting autograd run
makes every backward step materialise a full-size weight gradient per expert (10-20x slower than
the dense GEMM of the same FLOPs at 64+ experts). Here each expert's weight gradient is one GEMM
written straight into its slice of the packed gradient, and the routing weight is folded into the
smaller of the two activations so that the combine is a single sum per token.

Three paths, each an `ExpertLoops` (the experts' products, both products of a projection's
backward, the combine of rows into tokens) that the autograd function calls, chosen in
`plan_experts`:
- many tokens: one C++ call per product over all experts (`moekit.kernels.native`), torch's
  threads taking whole experts, largest first; each expert's products on moekit's tile kernel
  (fp32 on AVX-512 or AVX2) or on torch's `at::mm` (any dtype, any x86 CPU), whichever was measured
  faster on this CPU model where both run. SwiGLU experts without biases, routing weight on the
  output, run whole (gather, both products, activation, routing weight) in one call per pass.
- decode (fewer than DECODE_ROWS_PER_EXPERT rows per active expert): the same calls, bound by
  the experts' weight reads, on the caller's threads (one for a single active expert): how many
  that is, generation decides by timing its steps (`moekit.inference.step_threads`). Small
  decode-sized calls outside autograd skip the planner (`dispatch/few_rows.py`).
- portable (the C++ loops not built, `MOEKIT_NATIVE=0`, off the CPU, or `backend="grouped_mm"`):
  torch's `grouped_mm` where its dtype and strides allow (not for `backend="loop"`), else one
  `torch.mm` per expert.

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
from moekit.experts.activations import Activation
from moekit.kernels.native import expert_kernel
from moekit.routing.keysort import key_runs

BACKENDS = ("auto", "loop", "grouped_mm")
# With fewer rows than this per active expert (decode), the products are bound by the experts'
# weight reads, on the caller's threads (generation times one thread against all).
DECODE_ROWS_PER_EXPERT = 4


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
        """(order, bounds): the assignments sorted by token, stably (order [A]), token t's being
        order[bounds[t]:bounds[t+1]]; for the native combine. Token ids are small keys, so the
        stable sort is keysort's counting sort, which gives the bounds with the order."""
        return key_runs(self.token, self.num_tokens)

    @cached_property
    def tasks(self) -> Tensor:
        """nonempty as an int64 [n, 3] CPU tensor, the form the native expert loops take."""
        return torch.tensor(self.nonempty, dtype=torch.long).reshape(-1, 3)

    @staticmethod
    def build(token: Tensor, expert: Tensor, num_experts: int, num_tokens: int = 0) -> ExpertGroups:
        counts = torch.bincount(expert, minlength=num_experts)[:num_experts]
        return ExpertGroups(token, expert, tuple(counts.tolist()), num_tokens)


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


def grouped_mm_fits(dtype: torch.dtype, *widths: int) -> bool:
    """Whether torch's grouped_mm runs on operands of `dtype` whose rows are `widths` wide: fp32,
    bf16 or fp16 with 16-byte-aligned row strides."""
    aligned = all((n * dtype.itemsize) % 16 == 0 for n in widths)
    return grouped_mm_available() and dtype in (torch.float32, torch.bfloat16, torch.float16) and aligned


def packed_grad(shape: torch.Size, like: Tensor, empty_experts: list[int]) -> Tensor:
    """A packed [E, ...] weight gradient for per-expert products to write their slices into;
    experts that received no rows get exactly zero (in one call per run of them)."""
    packed = like.new_empty(shape)
    i = 0
    while i < len(empty_experts):
        j = i
        while j + 1 < len(empty_experts) and empty_experts[j + 1] == empty_experts[j] + 1:
            j += 1
        packed[empty_experts[i] : empty_experts[j] + 1].zero_()
        i = j + 1
    return packed


class ExpertLoops(Protocol):
    """One path's computation of the experts' products over expert-sorted rows."""

    whole_swiglu: bool  # SwiGLU experts without biases run whole (`swiglu_forward`/`_backward`)

    def products(self, rows: Tensor, weight: Tensor) -> Tensor:
        """out[rows of e] = rows[rows of e] @ weight[e]^T for packed `weight` [E, n_out, n_in]."""
        ...

    def backward_pairs(
        self, grad_rows: Tensor, in_rows: Tensor, weight: Tensor, weight_grad_needed: bool
    ) -> tuple[Tensor | None, Tensor]:
        """A projection's packed weight gradient (slice e = grad_rows[e]^T @ in_rows[e], zero for
        empty experts; None unless needed) and the gradient of its input rows (grad_rows[e] @ weight[e])."""
        ...

    def combine(self, rows: Tensor, num_tokens: int) -> Tensor:
        """out [num_tokens, d]: out[t] = the sum of the rows of t's assignments."""
        ...


@dataclass(frozen=True)
class NativeLoops:
    """The many-token and decode paths: one C++ call over all experts per product, on `threads`
    of torch's threads, each expert's products on `kernel` ("tile" or "mm")."""

    groups: ExpertGroups
    kernel: str
    threads: int
    whole_swiglu: bool = True

    def _op(self, name: str):
        return getattr(torch.ops.moekit, name if self.kernel == "tile" else f"{name}_mm")

    def products(self, rows: Tensor, weight: Tensor) -> Tensor:
        rows = rows.contiguous()
        out = rows.new_empty(rows.shape[0], weight.shape[1])
        self._op("expert_products")(rows, weight, out, self.groups.tasks, self.threads)
        return out

    def backward_pairs(
        self, grad_rows: Tensor, in_rows: Tensor, weight: Tensor, weight_grad_needed: bool
    ) -> tuple[Tensor | None, Tensor]:
        groups = self.groups
        grad_weight = (
            packed_grad(weight.shape, grad_rows, groups.empty_experts) if weight_grad_needed else None
        )
        grad_in = grad_rows.new_empty(grad_rows.shape[0], weight.shape[2])
        self._op("expert_backward_pairs")(
            grad_rows.contiguous(),
            in_rows.contiguous(),
            weight,
            grad_weight,
            grad_in,
            groups.tasks,
            self.threads,
        )
        return grad_weight, grad_in

    def combine(self, rows: Tensor, num_tokens: int) -> Tensor:
        """One pass in which each token's sum is one thread's: torch's index_add_ on the CPU was
        measured 4-8x slower on two threads (2048 tokens x 2-8 rows of 256-512, BENCHMARKS.md §13)."""
        out = rows.new_empty(num_tokens, rows.shape[1])
        combine = (
            torch.ops.moekit.combine_rows if self.kernel == "tile" else torch.ops.moekit.combine_rows_any
        )
        combine(rows.contiguous(), *self.groups.by_token, out)
        return out

    def swiglu_forward(self, x, scale, w_in, w_out, h, ys) -> None:
        token, tasks = self.groups.token, self.groups.tasks
        self._op("expert_swiglu_forward")(x, token, scale, w_in, w_out, h, ys, tasks, self.threads)

    def swiglu_backward(self, grad_out, x, scale, w_in, w_out, h, grads, grad_xs) -> None:
        token, tasks = self.groups.token, self.groups.tasks
        self._op("expert_swiglu_backward")(
            grad_out, x, token, scale, w_in, w_out, h, *grads, grad_xs, tasks, self.threads
        )


@dataclass(frozen=True)
class PortableLoops:
    """The portable path: torch's grouped_mm (`grouped_mm`), else one torch.mm per expert."""

    groups: ExpertGroups
    grouped_mm: bool
    whole_swiglu: bool = False

    def products(self, rows: Tensor, weight: Tensor) -> Tensor:
        if self.grouped_mm:
            return F.grouped_mm(rows, weight.transpose(1, 2), offs=self.groups.grouped_mm_offsets)
        out = rows.new_empty(rows.shape[0], weight.shape[1])
        for e, start, stop in self.groups.nonempty:
            torch.mm(rows[start:stop], weight[e].t(), out=out[start:stop])
        return out

    def backward_pairs(
        self, grad_rows: Tensor, in_rows: Tensor, weight: Tensor, weight_grad_needed: bool
    ) -> tuple[Tensor | None, Tensor]:
        groups = self.groups
        if self.grouped_mm:
            offsets = groups.grouped_mm_offsets
            grad_weight = F.grouped_mm(grad_rows.t(), in_rows, offs=offsets) if weight_grad_needed else None
            return grad_weight, F.grouped_mm(grad_rows, weight, offs=offsets)
        grad_weight = (
            packed_grad(weight.shape, grad_rows, groups.empty_experts) if weight_grad_needed else None
        )
        grad_in = grad_rows.new_empty(grad_rows.shape[0], weight.shape[2])
        for e, start, stop in groups.nonempty:
            if grad_weight is not None:
                torch.mm(grad_rows[start:stop].t(), in_rows[start:stop], out=grad_weight[e])
            torch.mm(grad_rows[start:stop], weight[e], out=grad_in[start:stop])
        return grad_weight, grad_in

    def combine(self, rows: Tensor, num_tokens: int) -> Tensor:
        return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, self.groups.token, rows)


def _bias_grad(grad_rows: Tensor, groups: ExpertGroups, num_experts: int) -> Tensor:
    out = grad_rows.new_zeros(num_experts, grad_rows.shape[1])
    return out.index_add_(0, groups.expert, grad_rows)


@dataclass(frozen=True)
class ExpertPlan:
    """Everything non-differentiable the grouped function needs."""

    groups: ExpertGroups
    activation: Activation
    weight_on: str  # "output" | "input"
    loops: ExpertLoops

    @property
    def path(self) -> str:
        """ "many_tokens", "decode" or "portable" (for reports)."""
        if not isinstance(self.loops, NativeLoops):
            return "portable"
        rows, active = len(self.groups.token), len(self.groups.nonempty)
        return "decode" if _is_decode(rows, active) else "many_tokens"


def _scale(weight: Tensor, x: Tensor) -> Tensor:
    """The routing weights as a column [A, 1] in the activations' dtype."""
    return weight.to(x.dtype).unsqueeze(1)


class GroupedExperts(torch.autograd.Function):
    """y[t] = sum over kept assignments (t, e, w) of w * expert_e(x[t]) (or expert_e(w * x[t]))."""

    @staticmethod
    def forward(ctx, x, weight, w_in, w_out, b_in, b_out, plan: ExpertPlan):
        ctx.plan = plan
        ctx.has_bias = (b_in is not None, b_out is not None)
        ctx.whole_swiglu = (
            plan.loops.whole_swiglu
            and plan.activation.name == "swiglu"
            and plan.weight_on == "output"
            and b_in is None
            and b_out is None
        )
        if ctx.whole_swiglu:
            return GroupedExperts._swiglu_forward(ctx, x, weight, w_in, w_out, plan)
        groups, act, loops = plan.groups, plan.activation, plan.loops
        scale = _scale(weight, x)
        xs = x.index_select(0, groups.token)
        xs_in = xs * scale if plan.weight_on == "input" else xs
        h = loops.products(xs_in, w_in)
        if b_in is not None:
            h += b_in.index_select(0, groups.expert)
        a = act.forward(h)
        a_in = a * scale if plan.weight_on == "output" else a
        ys = loops.products(a_in, w_out)
        if b_out is not None:
            bias_rows = b_out.index_select(0, groups.expert)
            ys += bias_rows * scale if plan.weight_on == "output" else bias_rows
        out = loops.combine(ys, x.shape[0])
        ctx.save_for_backward(xs, weight, w_in, w_out, b_out, h, a, a_in)
        return out

    @staticmethod
    def _swiglu_forward(ctx, x, weight, w_in, w_out, plan: ExpertPlan):
        """SwiGLU experts whole in one C++ call. Only h is kept for backward (with x): the
        activations are formed again there, per expert, in cache (BENCHMARKS.md §13), and the
        experts' rows of x read again (in place on the tile kernel, gathered on at::mm).
        Outside autograd (no input needs a gradient) no h is kept: the call writes it only into
        its work space."""
        rows, ff = len(plan.groups.token), w_out.shape[2]
        x = x.contiguous()
        h = x.new_empty(rows, 2 * ff) if any(ctx.needs_input_grad) else None
        ys = x.new_empty(rows, w_out.shape[1])
        plan.loops.swiglu_forward(x, weight.to(x.dtype).contiguous(), w_in, w_out, h, ys)
        ctx.save_for_backward(weight, w_in, w_out, x, h)
        return plan.loops.combine(ys, x.shape[0])

    @staticmethod
    def _swiglu_backward(ctx, grad_out):
        plan: ExpertPlan = ctx.plan
        weight, w_in, w_out, x, h = ctx.saved_tensors
        needs = ctx.needs_input_grad
        groups, rows = plan.groups, len(plan.groups.token)
        grad_out = grad_out.contiguous()
        grad_w_in = packed_grad(w_in.shape, w_in, groups.empty_experts) if needs[2] else None
        grad_w_out = packed_grad(w_out.shape, w_out, groups.empty_experts) if needs[3] else None
        grad_scale = grad_out.new_empty(rows)
        grad_xs = grad_out.new_empty(rows, x.shape[1])
        scale = weight.to(x.dtype).contiguous()
        plan.loops.swiglu_backward(
            grad_out, x, scale, w_in, w_out, h, (grad_w_in, grad_w_out, grad_scale), grad_xs
        )
        grad_x = plan.loops.combine(grad_xs, grad_out.shape[0]) if needs[0] else None
        grad_weight = grad_scale.to(weight.dtype) if needs[1] else None
        return grad_x, grad_weight, grad_w_in, grad_w_out, None, None, None

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.whole_swiglu:
            return GroupedExperts._swiglu_backward(ctx, grad_out)
        plan: ExpertPlan = ctx.plan
        xs, weight, w_in, w_out, b_out, h, a, a_in = ctx.saved_tensors
        groups, act, loops = plan.groups, plan.activation, plan.loops
        num_experts = w_in.shape[0]
        scale = _scale(weight, xs)
        on_output = plan.weight_on == "output"

        grad_ys = grad_out.contiguous().index_select(0, groups.token)
        grad_w_out, grad_a_in = loops.backward_pairs(grad_ys, a_in, w_out, ctx.needs_input_grad[3])
        grad_weight = None
        if on_output:
            grad_weight = torch.linalg.vecdot(grad_a_in, a)
            if b_out is not None:
                grad_weight += torch.linalg.vecdot(grad_ys, b_out.index_select(0, groups.expert))
            grad_a = grad_a_in.mul_(scale)
        else:
            grad_a = grad_a_in
        grad_b_out = None
        if ctx.has_bias[1] and ctx.needs_input_grad[5]:
            grad_b_out = _bias_grad(grad_ys * scale if on_output else grad_ys, groups, num_experts)

        grad_h = act.backward(h, grad_a)
        xs_in = xs if on_output else xs * scale
        grad_w_in, grad_xs = loops.backward_pairs(grad_h, xs_in, w_in, ctx.needs_input_grad[2])
        grad_b_in = (
            _bias_grad(grad_h, groups, num_experts) if ctx.has_bias[0] and ctx.needs_input_grad[4] else None
        )
        if not on_output:
            grad_weight = torch.linalg.vecdot(grad_xs, xs)
            grad_xs.mul_(scale)
        grad_x = loops.combine(grad_xs, grad_out.shape[0])
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None


def _is_decode(rows: int, active_experts: int) -> bool:
    return rows < DECODE_ROWS_PER_EXPERT * max(1, active_experts)


def plan_experts(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: Activation,
    weight_on: str = "output",
    backend: str = "auto",
    threads: int | None = None,
) -> ExpertPlan:
    """How the kept assignments (expert-sorted `token`, `expert`) will be computed: which path,
    kernel and threads. `threads` forces the native loops' thread count (tests)."""
    groups = ExpertGroups.build(token, expert, w_in.shape[0], x.shape[0])
    active = len(groups.nonempty)
    decode = _is_decode(len(token), active)
    kernel = expert_kernel(x, w_in, w_out, decode=decode) if backend != "grouped_mm" else None
    if kernel is None:
        return portable_plan(x, token, expert, w_in, w_out, activation, weight_on, backend)
    if threads is None:
        threads = torch.get_num_threads()
        if decode:
            # decode reads each expert's weights for a row or two: on the caller's threads, whose
            # number generation chooses by timing its steps (`inference.step_threads`)
            threads = threads if active > 1 else 1
        elif active < 2:
            # one expert: the tile kernel computes on one thread, torch's mm on all
            kernel = "mm"
    return ExpertPlan(groups, activation, weight_on, NativeLoops(groups, kernel, threads))


def portable_plan(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: Activation,
    weight_on: str = "output",
    backend: str = "auto",
) -> ExpertPlan:
    """The portable path (what a GPU, or a CPU without the C++ loops, runs): torch's grouped_mm
    where its dtype and strides allow and `backend` is not "loop", else torch.mm per expert."""
    num_experts, in_features, hidden = w_in.shape
    groups = ExpertGroups.build(token, expert, num_experts, x.shape[0])
    grouped_mm = backend != "loop" and grouped_mm_fits(x.dtype, hidden, in_features, w_out.shape[2])
    return ExpertPlan(groups, activation, weight_on, PortableLoops(groups, grouped_mm))


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
    threads: int | None = None,
) -> Tensor:
    """Run the kept assignments (expert-sorted `token`, `expert`, `weight`) through packed experts.
    Under autocast, in its dtype: the fp32 weights are cast as autocast casts a linear layer's,
    except in decode-sized calls outside autograd on the CPU, which compute from the fp32 weights
    as they are and return the autocast dtype (`decodes_from_fp32_weights`). Small decode-sized
    calls outside autograd skip the planner (`dispatch/few_rows.py`)."""
    dtype = autocast_dtype(x)
    if dtype is not None:
        from moekit.dispatch.few_rows import decodes_from_fp32_weights

        if decodes_from_fp32_weights(x, token.numel(), expert, w_in, w_out, weight, b_in, b_out):
            with no_autocast(x):
                y = grouped_experts(
                    x.float(), token, expert, weight, w_in, w_out, b_in, b_out, activation, weight_on,
                    backend, threads,
                )  # fmt: skip
            return y.to(dtype)
    if dtype is None and backend == "auto" and threads is None:
        from moekit.dispatch.few_rows import few_rows_experts, few_rows_kernel, runs_whole

        whole = runs_whole(activation, weight_on, b_in, b_out)
        way = few_rows_kernel(x, token.numel(), w_in, w_out, weight, b_in, b_out, whole=whole, expert=expert)
        if way is not None:
            args = (x, token, expert, weight, w_in, w_out, b_in, b_out, activation, weight_on)
            return few_rows_experts(*args, kernel=way[0], threads=way[1])
    if dtype is not None:
        x, w_in, w_out = x.to(dtype), w_in.to(dtype), w_out.to(dtype)
        b_in = None if b_in is None else b_in.to(dtype)
        b_out = None if b_out is None else b_out.to(dtype)
    plan = plan_experts(x, token, expert, w_in, w_out, activation, weight_on, backend, threads)
    with no_autocast(x) if dtype is not None else nullcontext():
        return GroupedExperts.apply(x, weight, w_in, w_out, b_in, b_out, plan)
