"""Reductions across a `torch.distributed` process group, where `group=None` means this process alone.

`torch.distributed` reads `group=None` as the world group; moekit reads it as "no reduction", so a
single-process caller never needs an initialised process group. Pass `torch.distributed.group.WORLD`
(or a data/expert-parallel subgroup) to reduce across ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def all_reduce_sum(tensor: Tensor, group: object | None) -> Tensor:
    """The sum of `tensor` over the group's ranks, as a new tensor without gradient."""
    out = tensor.detach().clone()
    if group is not None:
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group)
    return out


def all_reduce_max(tensor: Tensor, group: object | None) -> Tensor:
    """The element-wise maximum of `tensor` over the group's ranks, as a new tensor."""
    out = tensor.detach().clone()
    if group is not None:
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX, group=group)
    return out
