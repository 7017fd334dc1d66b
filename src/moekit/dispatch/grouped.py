"""Grouped expert compute with its own autograd.

Why its own backward: slicing a packed [E, ...] parameter per expert and letting autograd run
makes every backward step materialise a full-size weight gradient per expert (10-20x slower than
the dense GEMM of the same FLOPs at 64+ experts). Here each expert's weight gradient is one GEMM
written straight into its slice of the packed gradient, and the routing weight is folded into the
smaller of the two activations so that the combine is a single sum per token.

Backends, chosen per call:
- `loop`: one GEMM per non-empty expert over expert-sorted rows, written into its slice of the
  output; any dtype. The loops over the experts are compiled (`dispatch/loops.py`), each expert's
  two backward GEMMs run together, and runs of experts go to single-threaded workers
  (`dispatch/workers.py`) where that pays. On the workers, fp32 products run on moekit's own
  kernel (`moekit.kernels.native`, AVX-512) where it is built, and SwiGLU experts without biases
  run whole (gather, products, activation, routing weight) in one compiled loop per run of
  experts; elsewhere the products go to `moekit.kernels.gemm` (oneDNN or MKL, whichever is faster
  here), and large experts run their whole forward and backward as one task (`dispatch/fused.py`).
- `grouped_mm`: `torch.nn.functional.grouped_mm` (fp32/bf16/fp16, 16-byte-aligned strides), one
  C++ loop over the experts; `auto` takes it for decode-sized inputs (a few rows per expert)
  where moekit's own kernel does not run, weight gradients included: one call, unthreaded, or
  on the caller's threads where the experts' weights take long enough to read to pay the
  hand-off; with more rows, one call per worker over a share of the experts where that pays.

Decode (a few rows per expert) reads each chosen expert's weights once and is bound by memory
bandwidth: `auto` runs it on moekit's own kernel where that runs (fp32), on the calling thread
unless the reads are long enough to pay a hand-off, in which case on the caller's threads: how
many that is, generation decides by timing its steps (`moekit.inference.step_threads`).

Off the CPU (CUDA) the plan is chosen by the tensors' device alone (`device_plan`): grouped_mm where
it runs, else the loop on plain `torch.mm`; never the CPU machinery (workers, native kernel, oneDNN
row cuts). Under autocast (bf16 mixed precision) the experts run in the autocast dtype with fp32
routing weights, their gradients flowing back to the fp32 weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.device import autocast_dtype, no_autocast
from moekit.dispatch.fused import FusedExperts, packed_grad
from moekit.dispatch.loops import expert_loops
from moekit.dispatch.workers import (
    Slice,
    balanced_chunks,
    for_each_expert,
    for_each_run,
    run_shares,
    single_threaded,
    workers_enabled,
)
from moekit.experts.activations import Activation
from moekit.kernels.gemm import RowCuts, onednn_is_faster, row_cuts, weight_grad
from moekit.kernels.native import native_fits

BACKENDS = ("auto", "loop", "grouped_mm")
# With MKL, expert GEMMs of more FLOPs than this are threaded well by MKL itself: keep them whole.
SMALL_EXPERT_FLOPS = 256e6
# Below this estimated time per expert GEMM, handing experts to workers costs more than it saves.
MIN_EXPERT_SECONDS = 50e-6
# With fewer rows than this per active expert (decode), `auto` picks the native loops on the
# workers where they run, else grouped_mm.
DECODE_ROWS_PER_EXPERT = 4
# An expert's first product should take at least this long to run its whole expert as one task
# (library kernels on the workers).
MIN_FUSED_EXPERT_SECONDS = 1e-3
# A grouped_mm share on a worker should take at least this long to pay for the hand-off.
MIN_SHARE_SECONDS = 100e-6
# Rough single-core rates used for that estimate (this machine class: AVX2/AVX-512, ~2 cores).
CORE_FLOPS_PER_S = 100e9
CORE_FLOPS_PER_S_ONEDNN = 250e9
CORE_BYTES_PER_S = 10e9


@dataclass(frozen=True)
class ExpertShare:
    """Experts [first, stop) and their rows: one worker's part of a grouped_mm backend call."""

    first: int
    stop: int
    row_offsets: tuple[int, ...]  # start row of each expert in [first, stop), then the end row
    device: torch.device

    @property
    def row_start(self) -> int:
        return self.row_offsets[0]

    @property
    def row_stop(self) -> int:
        return self.row_offsets[-1]

    @cached_property
    def grouped_mm_offsets(self) -> Tensor:
        """Each expert's end row relative to row_start, as grouped_mm takes them."""
        ends = [end - self.row_start for end in self.row_offsets[1:]]
        return torch.tensor(ends, dtype=torch.int32, device=self.device)


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
        order[bounds[t]:bounds[t+1]]; for the native combine."""
        order = torch.argsort(self.token, stable=True)
        bounds = self.token.new_zeros(self.num_tokens + 1)
        torch.cumsum(torch.bincount(self.token, minlength=self.num_tokens), 0, out=bounds[1:])
        return order, bounds

    @cached_property
    def tasks(self) -> Tensor:
        """nonempty as an int64 [n, 3] CPU tensor, the form the native kernel's expert loops take."""
        return torch.tensor(self.nonempty, dtype=torch.long).reshape(-1, 3)

    def shares(self, parts: int) -> tuple[ExpertShare, ...]:
        """The experts cut into at most `parts` consecutive ranges of about equal rows, together
        covering every expert (the empty ones inside the range they fall in)."""
        chunks = balanced_chunks(self.nonempty, parts)
        firsts = [0] + [chunk[0][0] for chunk in chunks[1:]] + [len(self.counts)]
        return tuple(
            ExpertShare(first, stop, self.offsets[first : stop + 1], self.token.device)
            for first, stop in itertools.pairwise(firsts)
        )

    @staticmethod
    def build(token: Tensor, expert: Tensor, num_experts: int, num_tokens: int = 0) -> ExpertGroups:
        counts = torch.bincount(expert, minlength=num_experts)[:num_experts]
        return ExpertGroups(token, expert, tuple(counts.tolist()), num_tokens)


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


def choose_backend(requested: str, dtype: torch.dtype, hidden: int, in_features: int, ff: int) -> str:
    """Resolve the backend: grouped_mm only where it runs (dtype, 16-byte strides), else the loop;
    `auto` means the loop (`grouped_experts` picks grouped_mm itself for decode-sized inputs)."""
    if requested != "grouped_mm":
        return "loop"
    aligned = all((n * dtype.itemsize) % 16 == 0 for n in (hidden, in_features, ff))
    usable = grouped_mm_available() and dtype in (torch.float32, torch.bfloat16, torch.float16) and aligned
    return "grouped_mm" if usable else "loop"


def _bias_grad(grad_rows: Tensor, groups: ExpertGroups, num_experts: int) -> Tensor:
    out = grad_rows.new_zeros(num_experts, grad_rows.shape[1])
    return out.index_add_(0, groups.expert, grad_rows)


@dataclass(frozen=True)
class ExpertPlan:
    """Everything non-differentiable the grouped function needs."""

    groups: ExpertGroups
    activation: Activation
    weight_on: str  # "output" | "input"
    backend: str  # "loop" | "grouped_mm"
    parallel: bool = False  # whole experts per single-threaded worker
    single_threaded: bool = False  # decode-sized GEMMs: unthreaded is faster than MKL's hand-off
    # grouped_mm on the workers: one call per share of the experts (empty: one call in all)
    shares: tuple[ExpertShare, ...] = ()
    # loop on the workers: each expert's whole forward and backward as one task
    fused: FusedExperts | None = None
    # products on moekit's own kernel (`kernels.native`): one C++ call per product over all
    # experts, torch's threads taking them whole (`parallel`), else the calling thread
    native: bool = False
    # native SwiGLU experts, routing weight on the output: each expert's whole forward and backward
    # in one C++ call (`moekit::expert_swiglu_forward`), used when the experts have no biases
    swiglu_loops: bool = False


def _rows_times_weight(rows: Tensor, weight: Tensor, plan: ExpertPlan) -> Tensor:
    """out[rows of e] = rows[rows of e] @ weight[e].T for packed `weight` [E, n_out, n_in]."""
    if plan.native:
        rows = rows.contiguous()
        out = rows.new_empty(rows.shape[0], weight.shape[1])
        torch.ops.moekit.expert_products(rows, weight, out, plan.groups.tasks, _threads(plan))
        return out
    return _rows_times(rows, weight.transpose(1, 2), plan)


def _rows_times_weight_t(rows: Tensor, weight: Tensor, plan: ExpertPlan) -> Tensor:
    """out[rows of e] = rows[rows of e] @ weight[e] for packed `weight` [E, n_out, n_in]."""
    return _rows_times(rows, weight, plan)


def _rows_times(rows: Tensor, right: Tensor, plan: ExpertPlan) -> Tensor:
    """out[rows of e] = rows[rows of e] @ right[e] for `right` [E, n_in, n_out] (any strides)."""
    if plan.shares:
        out = rows.new_empty(rows.shape[0], right.shape[2])

        def share_product(share: ExpertShare) -> None:
            out[share.row_start : share.row_stop] = _share_product(rows, right, share)

        run_shares(plan.shares, share_product)
        return out
    if plan.backend == "grouped_mm":
        return F.grouped_mm(rows, right, offs=plan.groups.grouped_mm_offsets)
    out = rows.new_empty(rows.shape[0], right.shape[2])
    products_into, _ = expert_loops()
    # right.transpose(1, 2)[e] = right[e].T, the operand `linear_rows` takes
    _run_expert_loop(plan, products_into, (rows, right.transpose(1, 2), out))
    return out


def _run_expert_loop(plan: ExpertPlan, loop, tensors: tuple[Tensor | None, ...]) -> None:
    """loop(*tensors, experts, starts, stops, cuts) over runs of the plan's experts (on the workers
    when the plan says so), the form `moekit.dispatch.loops` takes them in."""
    rows = tensors[0]
    cuts = row_cuts(rows.dtype) if rows.device.type == "cpu" else RowCuts(onednn=False)
    _run_over_experts(plan, loop, (*tensors,), (cuts,))


def _run_over_experts(plan: ExpertPlan, loop, leading: tuple, trailing: tuple = ()) -> None:
    """loop(*leading, experts, starts, stops, *trailing) over runs of the plan's experts."""

    def run(slices: Sequence[Slice]) -> None:
        experts, starts, stops = map(list, zip(*slices, strict=True))
        loop(*leading, experts, starts, stops, *trailing)

    for_each_run(plan.groups.nonempty, run, plan.parallel)


def _share_product(rows: Tensor, right: Tensor, share: ExpertShare) -> Tensor:
    """rows @ right[e] for the experts and rows of one share, in one grouped_mm call."""
    return F.grouped_mm(
        rows[share.row_start : share.row_stop],
        right[share.first : share.stop],
        offs=share.grouped_mm_offsets,
    )


def _share_weight_grad(grad_rows: Tensor, in_rows: Tensor, share: ExpertShare, packed: Tensor) -> None:
    """packed[e] = grad_rows[e]^T @ in_rows[e] for the experts of one share, zero where e has no
    rows. Written in place: the packed gradient is the largest tensor of a decode step (50 MB at
    128 experts of 256 x 128), and a grouped_mm result would have to be copied into it."""
    bounds = share.row_offsets
    empty_from = share.first  # experts [empty_from, e) have no rows: zeroed in one call
    for e, start, stop in zip(range(share.first, share.stop), bounds, bounds[1:], strict=False):
        if start == stop:
            continue
        if empty_from < e:
            packed[empty_from:e].zero_()
        torch.mm(grad_rows[start:stop].t(), in_rows[start:stop], out=packed[e])
        empty_from = e + 1
    if empty_from < share.stop:
        packed[empty_from : share.stop].zero_()


def _weight_grad(grad_rows: Tensor, in_rows: Tensor, plan: ExpertPlan, shape: torch.Size) -> Tensor:
    """Packed gradient [E, n_out, n_in]: slice e = grad_rows[e]^T @ in_rows[e]; empty experts 0.
    For the grouped_mm backend without shares (the loop backend's go with its input gradients)."""
    groups = plan.groups
    if plan.backend == "grouped_mm" and (plan.single_threaded or grad_rows.device.type != "cpu"):
        # decode, or a GPU: one kernel beats ~E Python-dispatched GEMMs and zero fills
        return F.grouped_mm(grad_rows.t(), in_rows, offs=groups.grouped_mm_offsets)
    packed = packed_grad(shape, grad_rows, groups.empty_experts)

    def run(e: int, s: int, t: int) -> None:
        packed[e].copy_(weight_grad(grad_rows[s:t], in_rows[s:t]))

    for_each_expert(groups.nonempty, run, plan.parallel)
    return packed


def _backward_pair(
    grad_rows: Tensor, in_rows: Tensor, weight: Tensor, plan: ExpertPlan, weight_grad_needed: bool
) -> tuple[Tensor | None, Tensor]:
    """The two products of one projection's backward: its packed weight gradient (slice e =
    grad_rows[e]^T @ in_rows[e]) and the gradient of its input rows (grad_rows[e] @ weight[e]).

    In the loop backend each expert does both at once, reading its gradient rows once while they
    are in cache (`loops.backward_pairs_into`); with grouped_mm they are two passes, or both in one
    task per share of the experts.
    """
    if plan.shares:
        grad_weight = grad_rows.new_empty(weight.shape) if weight_grad_needed else None
        grad_in = grad_rows.new_empty(grad_rows.shape[0], weight.shape[2])

        def share_pair(share: ExpertShare) -> None:
            if grad_weight is not None:
                _share_weight_grad(grad_rows, in_rows, share, grad_weight)
            grad_in[share.row_start : share.row_stop] = _share_product(grad_rows, weight, share)

        run_shares(plan.shares, share_pair)
        return grad_weight, grad_in
    if plan.backend == "grouped_mm":
        grad_weight = _weight_grad(grad_rows, in_rows, plan, weight.shape) if weight_grad_needed else None
        return grad_weight, _rows_times_weight_t(grad_rows, weight, plan)
    grad_weight = (
        packed_grad(weight.shape, grad_rows, plan.groups.empty_experts) if weight_grad_needed else None
    )
    grad_in = grad_rows.new_empty(grad_rows.shape[0], weight.shape[2])
    if plan.native:
        grad_rows, in_rows = grad_rows.contiguous(), in_rows.contiguous()
        tasks, threads = plan.groups.tasks, _threads(plan)
        torch.ops.moekit.expert_backward_pairs(
            grad_rows, in_rows, weight, grad_weight, grad_in, tasks, threads
        )
        return grad_weight, grad_in
    _, backward_pairs_into = expert_loops()
    weights = weight.transpose(1, 2)  # weights[e] = weight[e].T: grad_in rows = grad_rows @ weight[e]
    _run_expert_loop(plan, backward_pairs_into, (grad_rows, in_rows, weights, grad_weight, grad_in))
    return grad_weight, grad_in


def _combine(rows: Tensor, plan: ExpertPlan, num_tokens: int) -> Tensor:
    """out [num_tokens, d]: out[t] = the sum of the rows of t's assignments. On the native path one
    pass in which each token's sum is one thread's (`moekit::combine_rows`): torch's index_add_ on
    the CPU was measured 4-8x slower on two threads (2048 tokens x 2-8 rows of 256-512, loaded
    machine, BENCHMARKS.md §13)."""
    if plan.native and plan.groups.num_tokens == num_tokens:
        out = rows.new_empty(num_tokens, rows.shape[1])
        torch.ops.moekit.combine_rows(rows.contiguous(), *plan.groups.by_token, out)
        return out
    return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, plan.groups.token, rows)


def _threads(plan: ExpertPlan) -> int:
    """Threads for the native kernel's expert loops: torch's, or one where the plan keeps the
    experts on the calling thread (decode whose split reads do not pay off here)."""
    return torch.get_num_threads() if plan.parallel else 1


def _scale(weight: Tensor, x: Tensor) -> Tensor:
    """The routing weights as a column [A, 1] in the activations' dtype."""
    return weight.to(x.dtype).unsqueeze(1)


class GroupedExperts(torch.autograd.Function):
    """y[t] = sum over kept assignments (t, e, w) of w * expert_e(x[t]) (or expert_e(w * x[t]))."""

    @staticmethod
    def forward(ctx, x, weight, w_in, w_out, b_in, b_out, plan: ExpertPlan):
        with single_threaded() if plan.single_threaded else nullcontext():
            return GroupedExperts._forward(ctx, x, weight, w_in, w_out, b_in, b_out, plan)

    @staticmethod
    def backward(ctx, grad_out):
        with single_threaded() if ctx.plan.single_threaded else nullcontext():
            return GroupedExperts._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, x, weight, w_in, w_out, b_in, b_out, plan: ExpertPlan):
        ctx.plan = plan
        ctx.has_bias = (b_in is not None, b_out is not None)
        ctx.swiglu_loops = plan.swiglu_loops and b_in is None and b_out is None
        if ctx.swiglu_loops:
            return GroupedExperts._swiglu_forward(ctx, x, weight, w_in, w_out, plan)
        if plan.fused is not None:
            out, ctx.fused_rows = plan.fused.forward(x, _scale(weight, x), w_in, w_out, b_in, b_out)
            ctx.save_for_backward(x, weight, w_in, w_out, b_out)
            return out
        groups, act = plan.groups, plan.activation
        scale = _scale(weight, x)
        xs = x.index_select(0, groups.token)
        xs_in = xs * scale if plan.weight_on == "input" else xs
        h = _rows_times_weight(xs_in, w_in, plan)
        if b_in is not None:
            h += b_in.index_select(0, groups.expert)
        a = act.forward(h)
        a_in = a * scale if plan.weight_on == "output" else a
        ys = _rows_times_weight(a_in, w_out, plan)
        if b_out is not None:
            bias_rows = b_out.index_select(0, groups.expert)
            ys += bias_rows * scale if plan.weight_on == "output" else bias_rows
        out = _combine(ys, plan, x.shape[0])
        ctx.save_for_backward(xs, weight, w_in, w_out, b_out, h, a, a_in)
        return out

    @staticmethod
    def _swiglu_forward(ctx, x, weight, w_in, w_out, plan: ExpertPlan):
        """`swiglu_loops`: whole experts in one C++ call (`moekit::expert_swiglu_forward`), torch's
        threads taking experts largest first; the intermediates kept for backward."""
        rows, token = len(plan.groups.token), plan.groups.token
        ff = w_out.shape[2]
        xs = x.new_empty(rows, x.shape[1])
        h = x.new_empty(rows, 2 * ff)
        a = x.new_empty(rows, ff)
        a_in = x.new_empty(rows, ff)
        ys = x.new_empty(rows, w_out.shape[1])
        scale = weight.to(x.dtype).contiguous()
        tasks, threads = plan.groups.tasks, _threads(plan)
        torch.ops.moekit.expert_swiglu_forward(
            x.contiguous(), token, scale, w_in, w_out, xs, h, a, a_in, ys, tasks, threads
        )
        ctx.save_for_backward(weight, w_in, w_out, xs, h, a, a_in)
        return _combine(ys, plan, x.shape[0])

    @staticmethod
    def _swiglu_backward(ctx, grad_out):
        plan: ExpertPlan = ctx.plan
        weight, w_in, w_out, xs, h, a, a_in = ctx.saved_tensors
        needs = ctx.needs_input_grad
        groups, rows = plan.groups, len(plan.groups.token)
        grad_out = grad_out.contiguous()
        grad_w_in = packed_grad(w_in.shape, w_in, groups.empty_experts) if needs[2] else None
        grad_w_out = packed_grad(w_out.shape, w_out, groups.empty_experts) if needs[3] else None
        grad_scale = grad_out.new_empty(rows)
        grad_xs = grad_out.new_empty(rows, xs.shape[1])
        grad_a = grad_out.new_empty(rows, a.shape[1])
        grad_h = grad_out.new_empty(rows, h.shape[1])
        torch.ops.moekit.expert_swiglu_backward(
            grad_out, groups.token, weight.to(xs.dtype).contiguous(), w_in, w_out, xs, h, a, a_in,
            grad_w_in, grad_w_out, grad_scale, torch.empty_like(xs), grad_a, grad_h, grad_xs,
            groups.tasks, _threads(plan),
        )  # fmt: skip
        grad_x = None
        if needs[0]:
            grad_x = _combine(grad_xs, plan, grad_out.shape[0])
        grad_weight = grad_scale.to(weight.dtype) if needs[1] else None
        return grad_x, grad_weight, grad_w_in, grad_w_out, None, None, None

    @staticmethod
    def _backward(ctx, grad_out):
        plan: ExpertPlan = ctx.plan
        if ctx.swiglu_loops:
            return GroupedExperts._swiglu_backward(ctx, grad_out)
        if plan.fused is not None:
            x, weight, w_in, w_out, b_out = ctx.saved_tensors
            grads = plan.fused.backward(
                grad_out, x, _scale(weight, x), ctx.fused_rows, w_in, w_out, b_out, ctx.needs_input_grad[:6]
            )
            grad_x, grad_weight, *rest = grads
            return (grad_x, grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None, *rest, None)
        xs, weight, w_in, w_out, b_out, h, a, a_in = ctx.saved_tensors
        groups, act = plan.groups, plan.activation
        num_experts = w_in.shape[0]
        scale = _scale(weight, xs)
        on_output = plan.weight_on == "output"

        grad_ys = grad_out.contiguous().index_select(0, groups.token)
        grad_w_out, grad_a_in = _backward_pair(grad_ys, a_in, w_out, plan, ctx.needs_input_grad[3])
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
        grad_w_in, grad_xs = _backward_pair(grad_h, xs_in, w_in, plan, ctx.needs_input_grad[2])
        grad_b_in = (
            _bias_grad(grad_h, groups, num_experts) if ctx.has_bias[0] and ctx.needs_input_grad[4] else None
        )
        if not on_output:
            grad_weight = torch.linalg.vecdot(grad_xs, xs)
            grad_xs.mul_(scale)
        grad_x = _combine(grad_xs, plan, grad_out.shape[0])
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None


def _expert_seconds(
    rows: int, active_experts: int, in_features: int, hidden: int, dtype: torch.dtype
) -> float:
    """Rough single-core time of one expert's first GEMM: its FLOPs or its weight reads."""
    rate = CORE_FLOPS_PER_S_ONEDNN if onednn_is_faster(dtype) else CORE_FLOPS_PER_S
    flops = 2 * rows / max(1, active_experts) * in_features * hidden
    return max(flops / rate, in_features * hidden * dtype.itemsize / CORE_BYTES_PER_S)


def workers_pay_off(
    rows: int, active_experts: int, in_features: int, hidden: int, dtype: torch.dtype
) -> bool:
    """Whether whole experts on single-threaded workers beat threading each expert GEMM.

    Measured (BENCHMARKS.md): MKL threads large GEMMs well (8 experts x 512 rows x 512 x 2048), so
    with MKL those stay whole, but it loses much to its synchronisation on small ones (64 x 192 x
    512 x 512, and decode with 1-2 rows per expert reading 1-4 MB of weights), where workers win;
    oneDNN gains from workers at every training size. When an expert's GEMM takes only a few
    microseconds (decode at 128 experts of 256 x 256), the hand-off costs more than it saves.
    """
    if active_experts < 2:
        return False
    flops = 2 * rows / active_experts * in_features * hidden
    if not onednn_is_faster(dtype) and flops >= SMALL_EXPERT_FLOPS:
        return False
    return _expert_seconds(rows, active_experts, in_features, hidden, dtype) >= MIN_EXPERT_SECONDS


def fused_pays_off(rows: int, active_experts: int, in_features: int, hidden: int, dtype: torch.dtype) -> bool:
    """Whether each expert's whole forward and backward should run as one task (`fused.py`).
    Measured side by side on the library kernels: 4 % faster at 8 experts of 512 rows (512 x
    2048) and 5-8 % at the demo model's 16 experts of ~1024 rows, level at 64 experts of 192 rows
    and 7 % slower at 128 of 128: an expert task runs some twenty small ops, whose dispatch, on
    two threads at once, queues on the interpreter lock, while the unfused path runs them once
    over all experts. (On moekit's own kernel the experts run whole in C++ instead.)"""
    return _expert_seconds(rows, active_experts, in_features, hidden, dtype) >= MIN_FUSED_EXPERT_SECONDS


def shares_pay_off(
    rows: int, active_experts: int, in_features: int, hidden: int, dtype: torch.dtype, threads: int
) -> bool:
    """Whether one grouped_mm call per worker, each over a share of the experts, beats a single
    unthreaded call. Decode reads every active expert's weights for a row or two, which one core
    does at its own memory bandwidth (measured: 128 experts of 256 x 256, ~50 of them active, 1.43
    ms on one thread, 0.67 ms as two shares on two), once a share is long enough to pay the hand-off."""
    if active_experts < 2 or threads < 2:
        return False
    seconds = _expert_seconds(rows, active_experts, in_features, hidden, dtype) * active_experts
    return seconds / threads >= MIN_SHARE_SECONDS


def plan_experts(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: Activation,
    weight_on: str = "output",
    backend: str = "auto",
    parallel_workers: bool | None = None,
) -> ExpertPlan:
    """How the kept assignments (expert-sorted `token`, `expert`) will be computed: backend,
    workers, shares, whole-expert tasks, from their sizes and this machine's kernel."""
    if x.device.type != "cpu":
        return device_plan(x, token, expert, w_in, w_out, activation, weight_on, backend)
    num_experts, in_features, hidden = w_in.shape
    groups = ExpertGroups.build(token, expert, num_experts, x.shape[0])
    active = len(groups.nonempty)
    decode = len(token) < DECODE_ROWS_PER_EXPERT * max(1, active)
    threads = torch.get_num_threads()
    native = native_fits(x, w_in, w_out) and backend != "grouped_mm" and parallel_workers is not False
    estimate = (len(token), active, in_features, hidden, x.dtype)
    if native and (decode or active > 1):
        # moekit's own kernel: one C++ call per product (SwiGLU: per pass) over all experts,
        # torch's threads taking them whole. Decode reads each expert's weights for a row or
        # two: on the caller's threads where the reads are long enough to pay the hand-off
        # (generation chooses those threads by timing its steps, `inference.step_threads`).
        if parallel_workers is None:
            parallel_workers = shares_pay_off(*estimate, threads) if decode else threads > 1 and active > 1
        return ExpertPlan(
            groups,
            activation,
            weight_on,
            "loop",
            parallel_workers,
            single_threaded=decode and not parallel_workers,
            native=True,
            swiglu_loops=activation.name == "swiglu" and weight_on == "output",
        )
    # The library kernels: a few rows per expert in one C++ loop (grouped_mm), else per-expert
    # GEMMs, on the workers where that pays.
    if backend == "auto" and decode:
        backend = "grouped_mm"
    resolved = choose_backend(backend, x.dtype, hidden, in_features, w_out.shape[2])
    # decode: grouped_mm's products on the caller's threads where the reads pay the hand-off
    decode_threads = decode and shares_pay_off(*estimate, threads)
    if parallel_workers is None:
        pays = shares_pay_off(*estimate, threads) if resolved == "grouped_mm" else workers_pay_off(*estimate)
        parallel_workers = workers_enabled() and not decode and pays
    shares = groups.shares(threads) if resolved == "grouped_mm" and parallel_workers else ()
    parallel = parallel_workers and (resolved == "loop" or len(shares) > 1)
    fused = None
    if parallel and resolved == "loop" and fused_pays_off(*estimate):
        empty = tuple(groups.empty_experts)
        fused = FusedExperts(token, groups.nonempty, empty, activation, weight_on == "output")
    return ExpertPlan(
        groups,
        activation,
        weight_on,
        resolved,
        parallel,
        single_threaded=decode and not parallel and not decode_threads,
        shares=shares if parallel else (),
        fused=fused,
    )


def device_plan(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    activation: Activation,
    weight_on: str = "output",
    backend: str = "auto",
) -> ExpertPlan:
    """The plan off the CPU: grouped_mm (`auto` included) where its dtype and strides allow, else
    the per-expert loop; no workers, native kernel or whole-expert tasks, which are CPU machinery."""
    num_experts, in_features, hidden = w_in.shape
    groups = ExpertGroups.build(token, expert, num_experts)
    requested = "loop" if backend == "loop" else "grouped_mm"
    resolved = choose_backend(requested, x.dtype, hidden, in_features, w_out.shape[2])
    return ExpertPlan(groups, activation, weight_on, resolved)


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
    parallel_workers: bool | None = None,
) -> Tensor:
    """Run the kept assignments (expert-sorted `token`, `expert`, `weight`) through packed experts.
    Under autocast, in its dtype: the fp32 weights are cast as autocast casts a linear layer's.
    Small decode-sized calls outside autograd skip the planner (`dispatch/few_rows.py`)."""
    dtype = autocast_dtype(x)
    if dtype is None and backend == "auto" and parallel_workers is None:
        from moekit.dispatch.few_rows import few_rows_experts, few_rows_fit

        if few_rows_fit(x, token.numel(), w_in, w_out, weight, b_in, b_out):
            return few_rows_experts(x, token, expert, weight, w_in, w_out, b_in, b_out, activation, weight_on)
    if dtype is not None:
        x, w_in, w_out = x.to(dtype), w_in.to(dtype), w_out.to(dtype)
        b_in = None if b_in is None else b_in.to(dtype)
        b_out = None if b_out is None else b_out.to(dtype)
    plan = plan_experts(x, token, expert, w_in, w_out, activation, weight_on, backend, parallel_workers)
    with no_autocast(x) if dtype is not None else nullcontext():
        return GroupedExperts.apply(x, weight, w_in, w_out, b_in, b_out, plan)
