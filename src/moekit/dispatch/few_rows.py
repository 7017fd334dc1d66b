"""Small decode-sized expert calls outside autograd, without the planner.

A decode step of a small model spends more on planning its expert products than on computing
them: choosing backend, kernel and threads, building the plan, the combine's token order and
entering an autograd Function (measured on the tiny Qwen3-MoE at batch 1, one thread: 490 us per
MoE layer, about 3.5 us per op, of which the products and their gather and combine are a dozen
ops). Where no gradient is wanted and the products are too small to pay a thread hand-off, the
kept assignments go straight to the kernels the planned path would run, on one thread:
- SwiGLU experts without biases, routing weight on the output, where moekit's C++ expert loops run
  (`kernels.native`): the whole experts in one call (`expert_swiglu_forward` on the tile kernel or
  at::mm, whichever the plan would take), the products only of the experts chosen; its combine
  (`index_add_` in assignment order) sums each token's rows in the order of the planned combine.
  Measured, tiny Qwen3-MoE layer (8 experts of 32 x 16, top-2), one row, one thread on an AVX2
  EPYC: 116 us through grouped_mm, whose CPU kernel visits every expert, chosen or not.
- otherwise, where grouped_mm takes the operands: grouped_mm with offsets computed from the
  counts on the tensor side (no read on the host): the kernels, order and sums of the planned
  portable grouped_mm path (`dispatch/grouped.py`).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.device import autocast_dtype
from moekit.dispatch.compiled import summed_expert_rows
from moekit.dispatch.grouped import DECODE_ROWS_PER_EXPERT, ExpertGroups, NativeLoops, grouped_mm_fits
from moekit.dispatch.workers import too_small_to_share
from moekit.experts.activations import Activation
from moekit.experts.packed import PackedExperts
from moekit.kernels.native import expert_kernel
from moekit.routing.record import Assignments, Routing
from moekit.routing.token_choice import TokenChoiceRouter, choose_topk

if TYPE_CHECKING:
    from moekit.layer import MoE

# The most rows (tokens) a step's MoE layer takes in one call (`routed_rows`): decoding batches.
ONE_CALL_ROWS = 16


@cache
def grouped_mm_takes(dtype: torch.dtype, hidden: int, in_features: int, ff: int) -> bool:
    """Whether grouped_mm runs experts of these sizes and dtype (its dtypes, 16-byte strides)."""
    return grouped_mm_fits(dtype, hidden, in_features, ff)


def runs_whole(activation: Activation, weight_on: str, b_in: Tensor | None, b_out: Tensor | None) -> bool:
    """Whether the C++ loops run these experts whole (as the planned path's `whole_swiglu`)."""
    return activation.name == "swiglu" and weight_on == "output" and b_in is None and b_out is None


def reads_are_small(rows: int, w_in: Tensor, w_out: Tensor) -> bool:
    """Whether the experts `rows` assignments can reach read in less time than a thread hand-off
    pays for (the rough single-core rate of `dispatch.workers`): such calls run on one thread."""
    expert_bytes = (w_in.shape[1] * w_in.shape[2] + w_out.shape[1] * w_out.shape[2]) * w_in.element_size()
    return too_small_to_share(rows * expert_bytes)


def few_rows_kernel(
    x: Tensor,
    rows: int,
    w_in: Tensor,
    w_out: Tensor,
    *tensors: Tensor | None,
    whole: bool = False,
    expert: Tensor | None = None,
) -> tuple[str, int] | None:
    """(kernel, threads) where `rows` assignments of `x` go the few-rows way, or None where they do
    not: on the CPU, no gradient wanted of any operand, and either
    - the experts they can reach read in less time than a thread hand-off pays for (the rough
      single-core rate of `dispatch.workers`): one thread; "tile" or "mm", the C++ loops' kernel,
      for experts that run `whole` (`runs_whole`), else "grouped_mm" where it takes them; or
    - larger experts run whole on the tile kernel at decode sizes (fewer rows than
      DECODE_ROWS_PER_EXPERT per expert chosen, read from the expert-sorted ids `expert` on the
      host): the caller's threads, each taking whole experts, as the planned decode path runs
      them, in one call instead of the plan's dozen (0.2 ms a layer of `large` in the plan and
      its autograd Function)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if gradient_wanted(x, w_in, w_out, *tensors):
        return None
    small = reads_are_small(rows, w_in, w_out)
    decode = decode_sized(rows, expert, w_in.shape[0]) if expert is not None else rows == 0
    kernel = expert_kernel(x, w_in, w_out, decode=decode) if whole else None
    if kernel is not None and small:
        return kernel, 1
    if kernel == "tile" and decode and rows:
        return kernel, torch.get_num_threads()
    if not small:
        return None
    num_experts, in_features, hidden = w_in.shape
    fits = grouped_mm_takes(x.dtype, hidden, in_features, w_out.shape[2]) and w_out.dtype == x.dtype
    return ("grouped_mm", 1) if fits else None


def gradient_wanted(*tensors: Tensor | None) -> bool:
    """Whether autograd would want a gradient of any of `tensors` (None ones skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def decodes_from_fp32_weights(
    x: Tensor, rows: int, expert: Tensor, w_in: Tensor, w_out: Tensor, *tensors: Tensor | None
) -> bool:
    """Whether a call under autocast computes its experts from their fp32 weights as they are: on
    the CPU, fp32 weights, no gradient wanted of any operand, and decode-sized. A decoding step's
    cost is reading the weights of the experts it reaches; casting them first read them twice
    and wrote them once more (all of them, for the few a step reaches), and a layer's bf16 step
    took 3-18x fp32's time (the benchmark's shapes, T=1 and 8, AVX-512 Xeon; BENCHMARKS.md §7);
    now 1.0-1.3x. fp32 is also the more exact."""
    if x.device.type != "cpu" or w_in.dtype != torch.float32 or w_out.dtype != torch.float32:
        return False
    if gradient_wanted(x, w_in, w_out, *tensors):
        return False
    return decode_sized(rows, expert, w_in.shape[0])


def decode_sized(rows: int, expert: Tensor, num_experts: int) -> bool:
    """Whether `rows` expert-sorted assignments (ids `expert` of `num_experts`) are decode-sized:
    none, or fewer than DECODE_ROWS_PER_EXPERT per expert they reach (the planned path's
    `_is_decode`). The ids are read on the host only where the count of experts could decide it."""
    if rows == 0:
        return True
    if rows >= DECODE_ROWS_PER_EXPERT * min(rows, num_experts):
        return False  # more rows per expert than decode has, however many experts they reach
    ids = expert.tolist()
    active = 1 + sum(1 for a, b in zip(ids, ids[1:], strict=False) if a != b)
    return rows < DECODE_ROWS_PER_EXPERT * active


def few_rows_experts(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    weight: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: Activation,
    weight_on: str,
    kernel: str = "grouped_mm",
    threads: int = 1,
) -> Tensor:
    """y[t] = sum over the assignments (t, e, w), expert-sorted, of w * expert_e(x[t]) (or
    expert_e(w * x[t])), on `kernel` and `threads` (`few_rows_kernel`)."""
    if kernel != "grouped_mm":
        return _whole_experts(x, token, expert, weight, w_in, w_out, kernel, threads)
    offsets = torch.bincount(expert, minlength=w_in.shape[0]).cumsum(0, dtype=torch.int32)
    scale = (weight if weight.dtype == x.dtype else weight.to(x.dtype)).unsqueeze(1)
    return summed_expert_rows(
        x, token, expert, scale, b_in, b_out, activation, weight_on,
        lambda rows: F.grouped_mm(rows, w_in.transpose(1, 2), offs=offsets),
        lambda a: F.grouped_mm(a, w_out.transpose(1, 2), offs=offsets),
    )  # fmt: skip


def _whole_experts(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    weight: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    kernel: str,
    threads: int,
) -> Tensor:
    """SwiGLU experts whole in one C++ call on `threads`, as the planned path's forward computes
    them (`GroupedExperts._swiglu_forward`), without its plan, autograd Function and saved rows:
    on the tile kernel, tasks, work space and combine inside the call (`expert_swiglu_rows`)."""
    x = x.contiguous()
    scale = (weight if weight.dtype == x.dtype else weight.to(x.dtype)).contiguous()
    if kernel == "tile":
        return torch.ops.moekit.expert_swiglu_rows(x, token, expert, scale, w_in, w_out, threads)
    rows, d, ff = token.numel(), x.shape[1], w_out.shape[2]
    groups = ExpertGroups.build(token, expert, w_in.shape[0], x.shape[0])
    h, ys = x.new_empty(rows, 2 * ff), x.new_empty(rows, d)
    NativeLoops(groups, kernel, threads=threads).swiglu_forward(x, scale, w_in, w_out, h, ys)
    # each token's rows summed from zero in assignment order, as the planned combine sums them
    return x.new_zeros(x.shape[0], d).index_add_(0, token, ys)


def routed_rows(moe: MoE, x: Tensor, token_mask: Tensor | None) -> tuple[Tensor, Routing] | None:
    """(the routed experts' output, the routing) of a decoding step's few rows `x` [T, d] in one
    C++ call after the router's top-k (`moekit::topk_swiglu_rows`), or None where the general path
    must run. The values and the routing record are those of the general path (the router's own
    logits and top-k, `Assignments.from_dense`'s grouping, `_whole_experts`' products and sums):
    what is saved is its dozen small ops and their Python between the router and the experts
    (sort, gathers, divisions, the planner's checks), which a decoding step pays in every layer.

    Taken for every row real (`token_mask` None) where `rows_route_in_one_call`."""
    if token_mask is not None or not rows_route_in_one_call(moe, x):
        return None
    threads = 1 if reads_of_rows_are_small(moe, x.shape[0]) else torch.get_num_threads()
    y, logits, scores, kept = route_rows(moe, x, threads)
    return y, rows_routing(moe, x, logits, scores, kept)


def rows_route_in_one_call(moe: MoE, x: Tensor) -> bool:
    """Whether `route_rows` computes the MoE of rows like `x` [T, d] as the general path would:
    outside autograd, at most ONE_CALL_ROWS rows (a decoding step's batch: each expert then gets
    a few rows at most, which the general path computes with the same kernel and sums in the same
    order), no routing override attached (a capture is fine), a plain linear top-k router (no
    capacity) and packed SwiGLU experts without biases whose products run on the tile kernel."""
    router, experts, attached = moe.router, moe.experts, moe.routing_override
    if (
        torch.is_grad_enabled()
        or moe.training
        or (attached is not None and attached.override is not None and not attached.override.is_empty)
        or type(router) is not TokenChoiceRouter
        or type(experts) is not PackedExperts
        or x.shape[0] > ONE_CALL_ROWS
        or x.dtype != torch.float32
        or autocast_dtype(x) is not None
    ):
        return False
    spec, config = router.spec, moe.config
    if spec.capacity_factor is not None or config.backend != "auto":
        return False
    w_in, w_out = experts.w_in, experts.w_out
    if not runs_whole(experts.activation, spec.weight_on, experts.b_in, experts.b_out):
        return False
    if expert_kernel(x, w_in, w_out, decode=True) != "tile":
        return False
    # the general path takes the tile kernel for these rows too: where many rows take at::mm, only
    # if every expert gets fewer rows than decode's bound (a token reaches an expert once at most)
    return x.shape[0] < DECODE_ROWS_PER_EXPERT or expert_kernel(x, w_in, w_out) == "tile"


def reads_of_rows_are_small(moe: MoE, rows: int) -> bool:
    """Whether the experts `rows` rows reach read faster than a thread hand-off pays for: then
    `route_rows` takes one thread, else the caller's."""
    experts = moe.experts
    return reads_are_small(rows * moe.router.spec.top_k, experts.w_in, experts.w_out)


def route_rows(moe: MoE, x: Tensor, threads: int) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(routed output, router logits, scores, [token, expert, weight, rank] of the kept
    assignments) of rows `x` where `rows_route_in_one_call`, on `threads` (one where
    `reads_of_rows_are_small`)."""
    router, experts = moe.router, moe.experts
    logits = router.logits(x)
    selection_bias = router.selection_bias
    if selection_bias is not None:
        selection_bias = selection_bias.to(logits.dtype)
    scores, index, weights = choose_topk(logits, router.spec, selection_bias)
    y, *kept = torch.ops.moekit.topk_swiglu_rows(x, index, weights, experts.w_in, experts.w_out, threads)
    return y, logits, scores, kept


def rows_routing(moe: MoE, x: Tensor, logits: Tensor, scores: Tensor, kept: list[Tensor]) -> Routing:
    """The routing record of `route_rows`' results (as the general path records it)."""
    token, expert, weight, rank = kept
    return Routing(
        logits=logits,
        scores=scores,
        kept=Assignments(token=token, expert=expert, weight=weight, rank=rank),
        dropped=Assignments.empty(x.device),
        token_mask=all_real(x.shape[0], x.device),
        num_compute_experts=moe.router.spec.num_experts,
    )


@cache
def all_real(num_tokens: int, device: torch.device) -> Tensor:
    """The token mask of a step whose every row is real, made once per size (a routing record's
    `token_mask`, read and never written; an ordinary tensor, usable outside inference mode)."""
    with torch.inference_mode(False):
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
