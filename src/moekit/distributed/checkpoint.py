"""Checkpoints of an expert-parallel model in the ordinary single-process format.

Saving gathers every expert shard (parameters and their optimizer state) over its EP group into the
full [E, ...] tensors, and rank 0 writes the same directory `moekit.train.checkpoint` writes
(`model.safetensors`, `optimizer.safetensors`, `state.json`, atomically). Loading reads the full
tensors on every rank and keeps this rank's block of experts. So a checkpoint saved at any EP size
loads at any other, including 1 (plain `load_checkpoint`), and a single-process checkpoint loads
at any EP size. Every rank must reach the same directory (one machine, or a shared filesystem).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.distributed.expert_parallel import ExpertParallelExperts, gather_experts, sharded_parameter_names
from moekit.distributed.mesh import ParallelMesh
from moekit.errors import MoekitError
from moekit.io import load_tensors, read_json, save_tensors_atomic, write_json_atomic, write_text_atomic
from moekit.train.checkpoint import (
    LATEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    load_model_tensors,
    model_tensors,
    optimizer_tensors,
    resolve_checkpoint,
)


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
    extra: dict[str, Tensor] = {"rng/torch": torch.get_rng_state()}
    full_state = dict(state)
    if optimizer is not None:
        optimizer_state, scalars = full_optimizer_tensors(model, optimizer, mesh)
        extra.update(optimizer_state)
        full_state["optimizer_groups"] = scalars
    if mesh.is_main:
        _write_directory(directory, tensors, extra, full_state)
    if mesh.world_group is not None:
        dist.barrier(group=mesh.world_group)
    return directory


def _write_directory(
    directory: Path, tensors: dict[str, Tensor], extra: dict[str, Tensor], state: dict[str, Any]
) -> None:
    """The layout of `moekit.train.checkpoint.save_checkpoint`, written into a temporary directory
    that is renamed into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_tensors_atomic(tmp / MODEL_FILE, tensors)
        save_tensors_atomic(tmp / OPTIMIZER_FILE, extra)
        write_json_atomic(tmp / STATE_FILE, state)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(directory.parent / LATEST_FILE, directory.name + "\n")


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
    directory = resolve_checkpoint(path)
    state = read_json(directory / STATE_FILE, "checkpoint state")
    sharded = sharded_parameter_names(model)
    source = str(directory / MODEL_FILE)
    tensors = load_tensors(directory / MODEL_FILE, "checkpoint model")
    for name, module in sharded.items():
        if name in tensors:
            tensors[name] = _local_block(tensors[name], module, source, name)
    load_model_tensors(model, tensors, source)
    extra = load_tensors(directory / OPTIMIZER_FILE, "checkpoint optimizer")
    if restore_rng and "rng/torch" in extra:
        torch.set_rng_state(extra["rng/torch"])
    if optimizer is None:
        return state
    groups = state.get("optimizer_groups")
    if groups is None or len(groups) != len(optimizer.param_groups):
        raise MoekitError(f"{directory / STATE_FILE}: optimizer groups do not match this model")
    params = dict(model.named_parameters())
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        for key, value in saved.items():
            group[key] = tuple(value) if isinstance(value, list) else value
    source = str(directory / OPTIMIZER_FILE)
    for key, tensor in extra.items():
        if key.startswith("rng/"):
            continue
        name, _, state_key = key.rpartition("/")
        if name not in params:
            raise MoekitError(f"{source}: state for unknown parameter {name}")
        module = sharded.get(name)
        if module is not None and tensor.dim() > 0:
            tensor = _local_block(tensor, module, source, key)
        optimizer.state[params[name]][state_key] = tensor.clone()
    return state
