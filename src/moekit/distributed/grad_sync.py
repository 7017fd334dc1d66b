"""Gradient synchronisation and global gradient-norm clipping over the EP × DP mesh.

Summed, not averaged: `accumulate_gradients` divides every loss by global counts, so each rank's
gradient is its share of the global gradient and the shares add up (moe-systems.md P2).

- Dense (replicated) parameters: summed over all ranks.
- Expert shards: summed over the DP group of the shard (the ranks holding the same experts).

Every rank takes part in every reduction whether or not its parameters received a gradient this
step (moe-systems.md P9): a missing gradient contributes zeros, and a parameter keeps `grad = None`
only if no rank produced one, exactly as in a single process.

The global norm counts each expert shard once and each dense parameter once (P10): dense gradients
are identical everywhere after the sync, so their squared norm is taken locally; the expert shards'
squared norms are summed over the EP group (every DP replica of the group sees the same sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.distributed.expert_parallel import gather_experts, sharded_parameter_names
from moekit.distributed.mesh import ParallelMesh


@dataclass(frozen=True)
class ParameterSplit:
    """The model's trainable parameters, each once (tied ones under their first name), in order."""

    dense: list[nn.Parameter]
    expert: list[nn.Parameter]

    @staticmethod
    def of(model: nn.Module) -> ParameterSplit:
        sharded = sharded_parameter_names(model)
        dense, expert = [], []
        for name, p in model.named_parameters():  # deduplicates tied parameters
            if p.requires_grad:
                (expert if name in sharded else dense).append(p)
        return ParameterSplit(dense, expert)


def _sum_gradients(params: list[nn.Parameter], group: object | None) -> None:
    """Sum `.grad` over `group`: one flag reduction, then one flat buffer per dtype."""
    if group is None or not params:
        return
    device = params[0].device
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=device)
    dist.all_reduce(flags, group=group)
    has_grad = [bool(f) for f in flags.tolist()]
    for dtype in sorted({p.dtype for p in params}, key=str):
        bucket = [(p, g) for p, g in zip(params, has_grad, strict=True) if p.dtype == dtype]
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p, _ in bucket]
        )
        dist.all_reduce(flat, group=group)
        offset = 0
        for p, any_grad in bucket:
            n = p.numel()
            if any_grad:
                p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n


def sync_gradients(model: nn.Module, mesh: ParallelMesh) -> None:
    """Sum every gradient over the ranks that share its parameter (see the module docstring)."""
    split = ParameterSplit.of(model)
    _sum_gradients(split.dense, mesh.world_group)
    _sum_gradients(split.expert, mesh.dp_group)


def _squared_norm(params: list[nn.Parameter], like: Tensor) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=like.device)
    for p in params:
        if p.grad is not None:
            total = total + torch.linalg.vector_norm(p.grad.detach(), 2, dtype=torch.float64) ** 2
    return total


def global_grad_norm(model: nn.Module, mesh: ParallelMesh) -> Tensor:
    """The 2-norm of the full model's gradient (after `sync_gradients`), the same on every rank."""
    split = ParameterSplit.of(model)
    like = next(model.parameters())
    expert = _squared_norm(split.expert, like)
    if mesh.ep_group is not None:
        dist.all_reduce(expert, group=mesh.ep_group)
    return (_squared_norm(split.dense, like) + expert).sqrt()


def clip_grad_norm(model: nn.Module, mesh: ParallelMesh, max_norm: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole (sharded) model: scales every gradient by
    min(1, max_norm / (norm + 1e-6)) with the global norm; returns the norm before clipping."""
    norm = global_grad_norm(model, mesh)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return norm


def full_gradients(model: nn.Module, mesh: ParallelMesh) -> dict[str, Tensor | None]:
    """Every parameter's gradient by name as the single-process model would hold it (expert shards
    gathered to [E, ...]), for checks and debugging. Collective over the EP group."""
    sharded = sharded_parameter_names(model)
    out: dict[str, Tensor | None] = {}
    for name, p in model.named_parameters():
        if name in sharded:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            out[name] = gather_experts(grad, mesh)
        else:
            out[name] = None if p.grad is None else p.grad.detach().clone()
    return out
