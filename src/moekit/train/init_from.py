"""Start a run from a pretrained moekit checkpoint (`model.init_from`): the point of LoRAMoE and
SMoRA, whose experts are adapters on a frozen FFN that should hold pretrained knowledge, not
random weights.

Every tensor the checkpoint and the new model share by name is copied (embeddings, attention,
norms, dense FFNs); each MoE layer whose experts keep a frozen base FFN (`load_base`: LoRAMoE,
SMoRA) takes the checkpoint's dense FFN of the same layer as that base. A shared tensor whose shape
differs (another vocabulary, another width) is an error: the run would otherwise start half
pretrained without saying so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moekit.errors import MoekitError
from moekit.io import load_tensors, read_json
from moekit.train.checkpoint import MODEL_FILE, STATE_FILE, resolve_checkpoint, verify_checksums


def init_from_checkpoint(model: nn.Module, path: Path) -> dict[str, list[str]]:
    """Load a pretrained checkpoint into `model` as described above; returns the names copied
    ("copied") and the MoE layers given a pretrained base FFN ("bases")."""
    directory = resolve_checkpoint(path)
    verify_checksums(directory, read_json(directory / STATE_FILE, "checkpoint state"))
    source = directory / MODEL_FILE
    tensors = load_tensors(source, "pretrained model")
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
            experts = getattr(block.ffn, "experts", None)
            if not callable(getattr(experts, "load_base", None)):
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
