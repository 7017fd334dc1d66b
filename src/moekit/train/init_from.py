"""`model.init_from: PATH`: start a run from the weights of a moekit checkpoint (an upcycled one
included) or of an HF Llama / Mixtral / Qwen2-MoE folder, instead of a random init.

The model section may hold only `init_from` (the architecture is the checkpoint's) or more keys,
which replace the checkpoint's (shapes must still fit). Resuming a run later loads its own
checkpoint; `init_from` only decides the starting point of step 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def load_initial_weights(model: nn.Module, path: str) -> None:
    """Every tensor of `model` from the checkpoint or HF folder at `path` (shapes must match)."""
    folder = Path(path)
    from moekit.train.checkpoint import load_model_tensors

    if _is_hf(folder):
        from moekit.interop.lm_hf import lm_from_hf

        source = lm_from_hf(folder)
        tensors = {k: v.to(model.embed.weight.dtype) for k, v in source.state_dict().items()}
        if source.config.tie_embeddings:
            tensors.pop("head.weight", None)
        load_model_tensors(model, tensors, str(folder))
        return
    from moekit.io import load_tensors
    from moekit.train.checkpoint import MODEL_FILE, resolve_checkpoint

    directory = resolve_checkpoint(folder)
    tensors = load_tensors(directory / MODEL_FILE, "checkpoint model")
    load_model_tensors(model, {k: v.to(model.embed.weight.dtype) for k, v in tensors.items()}, str(directory))
