"""Small decode-sized expert calls outside autograd, without the planner.

A decode step of a small model spends more on planning its expert products than on computing
them: reading the per-expert counts on the host, choosing backend, kernel and threads, building
the plan and entering an autograd Function (measured on the tiny Qwen3-MoE at batch 1, one
thread: 490 us per MoE layer, about 3.5 us per op, of which the products and their gather and
combine are a dozen ops). Where no gradient is wanted, the products are too small to pay a thread
hand-off, and grouped_mm takes the operands, the kept assignments go straight through grouped_mm
with offsets computed from the counts on the tensor side (no read on the host): the kernels,
order and sums of the planned portable grouped_mm path (`dispatch/grouped.py`).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.dispatch.compiled import summed_expert_rows
from moekit.dispatch.grouped import grouped_mm_fits
from moekit.dispatch.workers import CORE_BYTES_PER_S, MIN_THREADED_SECONDS
from moekit.experts.activations import Activation


@cache
def grouped_mm_takes(dtype: torch.dtype, hidden: int, in_features: int, ff: int) -> bool:
    """Whether grouped_mm runs experts of these sizes and dtype (its dtypes, 16-byte strides)."""
    return grouped_mm_fits(dtype, hidden, in_features, ff)


def few_rows_fit(x: Tensor, rows: int, w_in: Tensor, w_out: Tensor, *tensors: Tensor | None) -> bool:
    """Whether `rows` assignments of `x` go the few-rows way: on the CPU, no gradient wanted of
    any operand, and the experts they can reach read in less time than a thread hand-off pays for
    (the rough single-core rate of `dispatch.workers`), so threads would not speed them up."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_in, w_out, *tensors)):
        return False
    expert_bytes = (w_in.shape[1] * w_in.shape[2] + w_out.shape[1] * w_out.shape[2]) * w_in.element_size()
    if rows * expert_bytes / CORE_BYTES_PER_S >= MIN_THREADED_SECONDS:
        return False
    num_experts, in_features, hidden = w_in.shape
    return grouped_mm_takes(x.dtype, hidden, in_features, w_out.shape[2]) and w_out.dtype == x.dtype


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
) -> Tensor:
    """y[t] = sum over the assignments (t, e, w), expert-sorted, of w * expert_e(x[t]) (or
    expert_e(w * x[t])), in grouped_mm calls whose offsets never leave the tensor side."""
    offsets = torch.bincount(expert, minlength=w_in.shape[0]).cumsum(0, dtype=torch.int32)
    scale = weight.to(x.dtype).unsqueeze(1)
    return summed_expert_rows(
        x, token, expert, scale, b_in, b_out, activation, weight_on,
        lambda rows: F.grouped_mm(rows, w_in.transpose(1, 2), offs=offsets),
        lambda a: F.grouped_mm(a, w_out.transpose(1, 2), offs=offsets),
    )  # fmt: skip
