"""`model.init_from: PATH`: start a run from the weights of a moekit checkpoint (an upcycled one
included) or of an HF Llama / Qwen2 / Qwen3 / Mixtral / Qwen2-MoE / Qwen3-MoE folder, instead of
a random init.

LoRAMoE and SMoRA experts are adapters on a frozen FFN that should hold pretrained knowledge, not
random weights: for a model with such experts, every tensor the checkpoint and the model share by
name is copied and each of those MoE layers takes the checkpoint's dense FFN of the same layer as
its base. Any other model must match the checkpoint tensor for tensor.

The model section may hold only `init_from` (the architecture is the checkpoint's) or more keys,
which replace the checkpoint's (shapes must still fit). Resuming a run later loads its own
checkpoint; `init_from` only decides the starting point of step 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.errors import ConfigError, MoekitError

FIELD = "model.init_from"


def _is_hf(path: Path) -> bool:
    return (path / "config.json").is_file()


def init_model_config(path: Any) -> dict[str, Any]:
    """The model section stored with the checkpoint at `path`."""
    if not isinstance(path, str) or not path:
        raise ConfigError(FIELD, f"got {path!r}, expected the path of a checkpoint or HF folder")
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(FIELD, f"{path}: no such folder")
    if _is_hf(folder):
        from moekit.interop.lm_hf import _transformers, lm_config_from_hf

        try:
            hf_config = _transformers().AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (ValueError, OSError) as exc:
            raise ConfigError(FIELD, f"{path}: transformers cannot read its config.json: {exc}") from None
        return lm_config_from_hf(hf_config, str(folder / "config.json")).to_dict()
    from moekit.train.checkpoint import read_checkpoint_state

    try:
        state = read_checkpoint_state(folder)
        return dict(state["config"]["model"])
    except MoekitError as exc:
        raise ConfigError(FIELD, str(exc)) from None
    except (KeyError, TypeError):
        raise ConfigError(FIELD, f"{path}: its state.json has no model config") from None


def load_initial_weights(model: nn.Module, path: str) -> dict[str, list[str]]:
    """Load the starting weights at `path` into `model` as described above; returns the names
    copied ("copied") and the MoE layers given a pretrained base FFN ("bases")."""
    folder = Path(path)
    from moekit.train.checkpoint import load_model_tensors

    if _is_hf(folder):
        from moekit.interop.lm_hf import lm_from_hf

        source = lm_from_hf(folder)
        tensors = {k: v.to(model.embed.weight.dtype) for k, v in source.state_dict().items()}
        if source.config.tie_embeddings:
            tensors.pop("head.weight", None)
        load_model_tensors(model, tensors, f"{FIELD} {folder}")
        return {"copied": sorted(tensors), "bases": []}
    from moekit.io import load_tensors, read_json
    from moekit.train.checkpoint import MODEL_FILE, STATE_FILE, resolve_checkpoint, verify_checksums

    directory = resolve_checkpoint(folder)
    verify_checksums(directory, read_json(directory / STATE_FILE, "checkpoint state"))
    tensors = load_tensors(directory / MODEL_FILE, "checkpoint model")
    tensors = {k: v.to(model.embed.weight.dtype) for k, v in tensors.items()}
    if any(_adapter_experts(block) is not None for block in getattr(model, "blocks", ())):
        return _load_with_bases(model, tensors, directory / MODEL_FILE)
    load_model_tensors(model, tensors, f"{FIELD} {directory}")
    return {"copied": sorted(tensors), "bases": []}


def _adapter_experts(block: nn.Module):
    experts = getattr(getattr(block, "ffn", None), "experts", None)
    return experts if callable(getattr(experts, "load_base", None)) else None


def _load_with_bases(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: Path
) -> dict[str, list[str]]:
    """Copy the shared tensors and give each adapter MoE layer the checkpoint's dense FFN as its base."""
    own = model.state_dict()
    copied, bases = [], []
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in own:
                continue
            if own[name].shape != tensor.shape:
                raise MoekitError(
                    f"model.init_from {source}: {name} has shape {tuple(tensor.shape)}, "
                    f"this model's is {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)
            copied.append(name)
        for index, block in enumerate(getattr(model, "blocks", ())):
            experts = _adapter_experts(block)
            if experts is None:
                continue
            proj_in, proj_out = (f"blocks.{index}.ffn.{p}.weight" for p in ("proj_in", "proj_out"))
            if proj_in not in tensors or proj_out not in tensors:
                raise MoekitError(
                    f"model.init_from {source}: no dense FFN for layer {index} ({proj_in}) to serve "
                    "as its experts' base; expected a dense checkpoint of the same layer count"
                )
            try:
                experts.load_base(tensors[proj_in], tensors[proj_out])
            except MoekitError as exc:
                raise MoekitError(f"model.init_from {source}: layer {index}: {exc}") from None
            bases.append(f"blocks.{index}")
    if not copied and not bases:
        raise MoekitError(f"model.init_from {source}: shares no tensor with this model")
    return {"copied": copied, "bases": bases}
