"""Checkpoints as safetensors + JSON, written atomically; resuming continues bit-identically.

A checkpoint is a directory:
- `model.safetensors`: the model's state dict (buffers included, e.g. the fp32 selection bias);
  a tied output head is stored once, as the embedding.
- `optimizer.safetensors`: every optimizer state tensor, named `<parameter name>/<state key>`,
  and the RNG state of torch's CPU generator.
- `state.json`: the run config, the step, the optimizer's scalar settings, the data position,
  the kernels the run computes with (`moekit.kernels.record`), anything else the trainer needs to
  continue, and the SHA-256 of the two tensor files, checked on load (a damaged or edited file is
  refused rather than trained on).
Tensors are written from CPU copies and loaded onto the model's own device, so a checkpoint
trained on a GPU loads on a CPU and the other way round.
It is written into a temporary directory that is renamed into place, so a crash leaves either the
old checkpoint or the new one, never half of one; the next write removes what a crash left behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.device import cpu_copy
from moekit.errors import MoekitError
from moekit.io import (
    check_tensor_names,
    load_tensors,
    read_json,
    save_tensors_atomic,
    write_json_atomic,
    write_text_atomic,
)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
LATEST_FILE = "latest"
CHECKSUMS_KEY = "sha256"
STEP_PREFIX = "step-"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_writes(parent: Path) -> None:
    """Remove what an interrupted `write_checkpoint` left in `parent`: temporary directories
    (`.<name>.<random>`), temporary files of an atomic write (`.<name>.<random>.tmp`, e.g. of the
    `latest` pointer), and a `.<name>.old` whose new version is in place; a `.<name>.old` whose
    new version never arrived is renamed back, since it is the last good copy."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)
            continue
        if not (entry.name.startswith(".") and entry.is_dir()):
            continue
        if entry.name.endswith(".old"):
            original = parent / entry.name[1 : -len(".old")]
            if not original.exists():
                os.replace(entry, original)
                continue
        shutil.rmtree(entry, ignore_errors=True)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied (storage-sharing) tensors kept once, under their first name."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen and tensor.numel():
            continue
        seen[key] = name
        out[name] = tensor
    return out


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load into `model`; tied tensors missing from the file are fine, anything else is an error."""
    state = model.state_dict()
    tied = set(state) - set(model_tensors(model))
    # tied tensors may be in the file or not
    check_tensor_names(source, set(state) - (tied - set(tensors)), tensors)
    for name, tensor in tensors.items():
        expected = tuple(state[name].shape)
        if tuple(tensor.shape) != expected:
            got = tuple(tensor.shape)
            raise MoekitError(f"{source}: {name} has shape {got}, the model expects {expected}")
    model.load_state_dict(tensors, strict=False)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, list]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        scalars.append({k: v for k, v in group.items() if k != "params"})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"{names[id(p)]}/{key}"] = value
    return tensors, scalars


def write_checkpoint(
    directory: Path, tensors: dict[str, torch.Tensor], extra: dict[str, torch.Tensor], state: dict[str, Any]
) -> Path:
    """Write the three files into a temporary directory, rename it into place, then point
    `<parent>/latest` at it."""
    directory = Path(directory)
    tensors = {name: cpu_copy(tensor) for name, tensor in tensors.items()}
    extra = {name: cpu_copy(tensor) for name, tensor in extra.items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_writes(directory.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_tensors_atomic(tmp / MODEL_FILE, tensors)
        save_tensors_atomic(tmp / OPTIMIZER_FILE, extra)
        checksums = {name: file_sha256(tmp / name) for name in (MODEL_FILE, OPTIMIZER_FILE)}
        write_json_atomic(tmp / STATE_FILE, {**state, CHECKSUMS_KEY: checksums})
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
    return directory


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
) -> Path:
    """Write a checkpoint directory atomically and point `<parent>/latest` at it."""
    extra = rng_tensors()
    full_state = dict(state)
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        tensors, scalars = optimizer_tensors(optimizer, names)
        extra.update(tensors)
        full_state["optimizer_groups"] = scalars
    return write_checkpoint(directory, model_tensors(model), extra, full_state)


def rng_tensors() -> dict[str, torch.Tensor]:
    """The generators' states to checkpoint: the CPU's, and the GPU's when one is in use."""
    extra = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        extra["rng/cuda"] = torch.cuda.get_rng_state()
    return extra


def restore_rng_tensors(extra: dict[str, torch.Tensor]) -> None:
    if "rng/torch" in extra:
        torch.set_rng_state(extra["rng/torch"])
    if "rng/cuda" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng/cuda"])


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory whose `latest` (or `checkpoints/latest`) names
    one; if that one is gone, the newest complete `step-*` checkpoint beside it."""
    path = Path(path)
    for base in (path, path / "checkpoints"):
        if (base / STATE_FILE).is_file():
            return base
        latest = base / LATEST_FILE
        if latest.is_file():
            candidate = base / latest.read_text().strip()
            if (candidate / STATE_FILE).is_file():
                return candidate
        if base.is_dir():
            steps = sorted(
                d for d in base.iterdir() if d.name.startswith(STEP_PREFIX) and (d / STATE_FILE).is_file()
            )
            if steps:
                return steps[-1]
    raise MoekitError(f"{path}: no checkpoint found (expected {STATE_FILE} or a '{LATEST_FILE}' file)")


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    return read_json(resolve_checkpoint(path) / STATE_FILE, "checkpoint state")


def verify_checksums(directory: Path, state: dict[str, Any]) -> None:
    """Refuse tensor files whose SHA-256 differs from the one state.json recorded when they were
    written (checkpoints written before checksums were recorded are not checked)."""
    recorded = state.get(CHECKSUMS_KEY) if isinstance(state, dict) else None
    if not isinstance(recorded, dict):
        return
    for name, expected in recorded.items():
        file = directory / name
        if not file.is_file():
            raise MoekitError(f"{file}: checkpoint file missing")
        if file_sha256(file) != expected:
            raise MoekitError(
                f"{file}: SHA-256 differs from the one recorded in {STATE_FILE} "
                "(the file was changed or damaged)"
            )


# Maps (parameter name, tensor as saved, file) to the tensor this process keeps, e.g. its block of
# experts under expert parallelism; the default keeps everything.
Localize = Callable[[str, torch.Tensor, str], torch.Tensor]


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
    localize: Localize | None = None,
) -> dict[str, Any]:
    """Load model (and optimizer, RNG) from a checkpoint; returns its state.json contents."""
    directory = resolve_checkpoint(path)
    state = read_json(directory / STATE_FILE, "checkpoint state")
    verify_checksums(directory, state)
    model_file = directory / MODEL_FILE
    tensors = load_tensors(model_file, "checkpoint model")
    if localize is not None:
        tensors = {name: localize(name, tensor, str(model_file)) for name, tensor in tensors.items()}
    load_model_tensors(model, tensors, str(model_file))
    optimizer_file = directory / OPTIMIZER_FILE
    extra = load_tensors(optimizer_file, "checkpoint optimizer")
    if restore_rng:
        restore_rng_tensors(extra)
    if optimizer is None:
        return state
    groups = state.get("optimizer_groups")
    if groups is None or len(groups) != len(optimizer.param_groups):
        raise MoekitError(f"{directory / STATE_FILE}: optimizer groups do not match this model")
    params = dict(model.named_parameters())
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        for key, value in saved.items():
            group[key] = tuple(value) if isinstance(value, list) else value
    for key, tensor in extra.items():
        if key.startswith("rng/"):
            continue
        name, _, state_key = key.rpartition("/")
        if name not in params:
            raise MoekitError(f"{optimizer_file}: state for unknown parameter {name}")
        if localize is not None and tensor.dim() > 0:
            tensor = localize(name, tensor, str(optimizer_file))
        # Adam's step counter stays a CPU scalar, as torch keeps it; moments go to the parameter's device
        device = params[name].device if tensor.dim() > 0 else tensor.device
        optimizer.state[params[name]][state_key] = tensor.to(device, copy=True)
    return state
