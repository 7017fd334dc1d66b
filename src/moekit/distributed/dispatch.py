"""Exchanging token rows between the ranks of an expert-parallel group, with autograd.

Two steps per exchange: the per-(rank, expert) row counts first (a fixed-size all-to-all, so every
rank knows how many rows it will receive), then the rows themselves with `all_to_all_single` and
variable splits. The row exchange is an autograd function whose backward is the reverse exchange.

Every rank takes part in every exchange, also when it sends or receives no rows (moe-systems.md
P9): the collectives are issued unconditionally, and a zero-row tensor still flows through
forward and backward, so no rank waits for a partner that skipped a step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def exchange_counts(send_counts: Tensor, group: object) -> Tensor:
    """`send_counts` [ep, n] int64: rows this rank sends to each rank, per local expert of the
    receiver. Returns [ep, n]: rows this rank receives from each rank, per own local expert."""
    received = torch.empty_like(send_counts)
    dist.all_to_all_single(received, send_counts.contiguous(), group=group)
    return received


class _RowExchange(torch.autograd.Function):
    """Rows [sum(send_splits), ...] → rows [sum(recv_splits), ...]; the gradient goes back the
    same way with the splits swapped."""

    @staticmethod
    def forward(ctx, rows: Tensor, send_splits: list[int], recv_splits: list[int], group: object) -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all(rows, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def _all_to_all(rows: Tensor, send_splits: list[int], recv_splits: list[int], group: object) -> Tensor:
    out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    dist.all_to_all_single(
        out, rows.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group
    )
    return out


def exchange_rows(rows: Tensor, send_splits: list[int], recv_splits: list[int], group: object) -> Tensor:
    """Send `rows` (grouped by destination rank, `send_splits[r]` rows for rank r) and return the
    rows received (grouped by source rank, `recv_splits[r]` from rank r). Differentiable."""
    return _RowExchange.apply(rows, list(send_splits), list(recv_splits), group)
