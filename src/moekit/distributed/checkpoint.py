"""Checkpoints of an expert-parallel model in the ordinary single-process format.

Saving gathers every expert shard (parameters and their optimizer state) over its EP group into the
full [E, ...] tensors, and rank 0 writes the same directory `moekit.train.checkpoint` writes
(`model.safetensors`, `optimizer.safetensors`, `state.json`, atomically). Loading reads the full
tensors on every rank and keeps this rank's block of experts. So a checkpoint saved at any EP size
loads at any other, including 1 (plain `load_checkpoint`), and a single-process checkpoint loads
at any EP size. Every rank must reach the same directory (one machine, or a shared filesystem).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.distributed.expert_parallel import ExpertParallelExperts, gather_experts, sharded_parameter_names
from moekit.distributed.mesh import ParallelMesh
from moekit.errors import MoekitError
from moekit.train.checkpoint import load_checkpoint as load_single_process_checkpoint
from moekit.train.checkpoint import model_tensors, optimizer_tensors, rng_tensors, write_checkpoint


def _is_expert_block(tensor: Tensor, module: ExpertParallelExperts) -> bool:
    return tensor.dim() > 0 and tensor.shape[0] == module.num_local_experts


def full_model_tensors(model: nn.Module, mesh: ParallelMesh) -> dict[str, Tensor]:
    """The model's tensors as a single-process model of the same config would hold them.
    Collective over the EP group; identical on every rank."""
    sharded = sharded_parameter_names(model)
    out = {}
    for name, tensor in model_tensors(model).items():
        out[name] = gather_experts(tensor, mesh) if name in sharded else tensor.detach()
    return out


def full_optimizer_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, mesh: ParallelMesh
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Optimizer state tensors named `<parameter>/<key>`, expert blocks gathered, and the groups'
    scalar settings. Collective over the EP group."""
    sharded = sharded_parameter_names(model)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, scalars = optimizer_tensors(optimizer, names)
    out = {}
    for key, tensor in tensors.items():
        name = key.rpartition("/")[0]
        module = sharded.get(name)
        gather = module is not None and _is_expert_block(tensor, module)
        out[key] = gather_experts(tensor, mesh) if gather else tensor.detach()
    return out, scalars


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    mesh: ParallelMesh,
) -> Path:
    """Write a single-process-format checkpoint directory from an expert-parallel model and point
    `<parent>/latest` at it. Collective: every rank calls it; rank 0 writes; all return together."""
    directory = Path(directory)
    tensors = full_model_tensors(model, mesh)
    extra: dict[str, Tensor] = rng_tensors()
    full_state = dict(state)
    if optimizer is not None:
        optimizer_state, scalars = full_optimizer_tensors(model, optimizer, mesh)
        extra.update(optimizer_state)
        full_state["optimizer_groups"] = scalars
    if mesh.is_main:
        write_checkpoint(directory, tensors, extra, full_state)
    if mesh.world_group is not None:
        dist.barrier(group=mesh.world_group)
    return directory


def _local_block(tensor: Tensor, module: ExpertParallelExperts, source: str, name: str) -> Tensor:
    if tensor.dim() == 0 or tensor.shape[0] != module.num_experts:
        raise MoekitError(
            f"{source}: {name} has shape {tuple(tensor.shape)}, expected {module.num_experts} experts first"
        )
    start = module.first_expert
    return tensor[start : start + module.num_local_experts].clone()


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a single-process-format checkpoint into an expert-parallel (or plain) model: each rank
    keeps its block of every expert tensor. Returns the state.json contents. Not collective."""
    sharded = sharded_parameter_names(model)

    def localize(name: str, tensor: Tensor, source: str) -> Tensor:
        module = sharded.get(name)
        return tensor if module is None else _local_block(tensor, module, source, name)

    return load_single_process_checkpoint(path, model, optimizer, restore_rng, localize)
