"""`from_hf` / `to_hf`: HF checkpoint folders in and out, and moekit's own family checkpoints.

An HF folder is `config.json` plus safetensors weights (one file or an index of shards); pickle
weights are refused. The config is parsed by the family's transformers config class (the `hf`
extra), so defaults the file leaves out are the ones transformers would use; the weights and the
forward are moekit's own. Every folder is written into a temporary sibling and renamed into place,
so an interrupted write never leaves half a checkpoint, and nothing is replaced unless asked.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.errors import ConfigError, MoekitError
from moekit.interop.convert import detect_layout, hf_to_moekit, moekit_to_hf, rules_for
from moekit.interop.families import FAMILIES, family_config_from_hf, family_spec
from moekit.interop.model import HF_LAYOUTS, FamilyConfig, FamilyModel
from moekit.io import check_tensor_names, load_tensors, read_json, write_json_atomic

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
FAMILY_CONFIG = "moekit_family.json"
FAMILY_WEIGHTS = "model.safetensors"
FAMILY_FORMAT = "moekit-family"
FAMILY_VERSION = 1
_ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every new tensor
# config.json entries that describe the file rather than the model; transformers fills them in
_FILE_FIELDS = (
    "architectures",
    "transformers_version",
    "model_type",
    "dtype",
    "torch_dtype",
    "_name_or_path",
)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MoekitError(
            "reading and writing HF configs needs transformers: pip install 'moekit[hf]'"
        ) from None
    return transformers


def _config_class(spec_name: str):
    spec = FAMILIES[spec_name]
    return getattr(_transformers(), spec.config_class)


def read_hf_config(path: Path) -> tuple[Any, dict[str, Any]]:
    """The transformers config object of an HF folder (its family checked first) and the raw
    config.json it was read from."""
    path = Path(path)
    if not path.is_dir():
        raise MoekitError(f"{path}: expected an HF model folder (config.json + safetensors)")
    if (path / FAMILY_CONFIG).is_file():
        raise MoekitError(
            f"{path}: this is a moekit family checkpoint; load it with moekit.interop.load_family"
        )
    data = read_json(path / HF_CONFIG, "HF config")
    if not isinstance(data, dict) or "model_type" not in data:
        raise MoekitError(f"{path / HF_CONFIG}: expected a JSON object with a model_type")
    spec = family_spec(data["model_type"], str(path / HF_CONFIG))
    cls = _config_class(spec.name)
    try:
        return cls.from_pretrained(str(path), local_files_only=True), data
    except Exception as exc:  # transformers' (strict dataclass) validation raises several types
        raise MoekitError(
            f"{path / HF_CONFIG}: transformers rejects it as a {spec.config_class}: {exc}"
        ) from None


def read_hf_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of an HF folder's safetensors weights (single file or sharded with an index)."""
    path = Path(path)
    if (path / HF_WEIGHTS).is_file():
        return load_tensors(path / HF_WEIGHTS, "HF weights")
    if (path / HF_INDEX).is_file():
        index = read_json(path / HF_INDEX, "HF weight index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise MoekitError(f"{path / HF_INDEX}: expected a 'weight_map' object")
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_tensors(path / shard, "HF weight shard"))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise MoekitError(f"{path / HF_INDEX}: lists tensors no shard holds: {', '.join(missing[:4])}")
        return tensors
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise MoekitError(
            f"{path}: only pickle weights (.bin/.pt) found; moekit reads safetensors only "
            "(pickle files can run code). Re-save with save_pretrained(safe_serialization=True)"
        )
    raise MoekitError(f"{path}: no {HF_WEIGHTS} or {HF_INDEX}")


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of an HF folder (one file, or the shards its index names)."""
    if (path / HF_WEIGHTS).is_file():
        return [path / HF_WEIGHTS]
    if (path / HF_INDEX).is_file():
        index = read_json(path / HF_INDEX, "HF weight index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise MoekitError(f"{path / HF_INDEX}: expected a 'weight_map' object")
        return [path / shard for shard in sorted(set(weight_map.values()))]
    read_hf_tensors(path)  # raises the error that names what is there instead
    return []


def _meta_tensors(files: list[Path]) -> dict[str, Tensor]:
    """Every tensor of `files` as a meta tensor of its shape and dtype (only headers read)."""
    from safetensors import SafetensorError, safe_open

    from moekit.inference.offload import SAFETENSORS_DTYPES

    out = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    piece = handle.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise MoekitError(f"{file}: tensor {name} has dtype {piece.get_dtype()}")
                    out[name] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
        except (SafetensorError, OSError) as exc:
            raise MoekitError(f"{file}: not a readable safetensors file ({exc})") from None
    return out


def _read_named(files: list[Path], names: list[str]) -> dict[str, Tensor]:
    """The tensors `names` (and no others) from `files`."""
    from safetensors import SafetensorError, safe_open

    wanted, out = set(names), {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if name in wanted:
                        out[name] = handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise MoekitError(f"{file}: not a readable safetensors file ({exc})") from None
    return out


def _cast(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Floating tensors to `dtype`; the selection bias stays fp32 (as the router keeps it)."""
    if dtype is None:
        return state
    return {
        k: v.to(dtype) if v.is_floating_point() and not k.endswith("selection_bias") else v
        for k, v in state.items()
    }


def _build(config: FamilyConfig, state: dict[str, Tensor], source: str) -> FamilyModel:
    """A model holding exactly `state` (no random init of full-size weights first)."""
    with torch.device("meta"):
        model = FamilyModel(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("head.weight")
    check_tensor_names(source, expected, state)
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise MoekitError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(expected[name].shape)}"
            )
    # Views into the file's buffer land at any 8-byte offset, and the CPU kernels' results depend
    # on their operands' alignment: own, 64-byte-aligned storage makes a model compute the same
    # bits however its file was laid out (and offloaded experts equal in-memory ones).
    state = {k: v if v.data_ptr() % _ALIGNMENT == 0 else v.clone() for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def from_hf(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    backend: str | None = None,
    experts_on_disk: bool = False,
) -> FamilyModel:
    """Load an HF MoE checkpoint folder as a moekit `FamilyModel` (eval mode).

    `dtype` casts the weights (default: as stored); `attn_implementation` ("sdpa" or "eager")
    overrides the family's default kernel; `backend` picks moekit's expert dispatch backend.
    `experts_on_disk`: leave the routed experts unread (meta tensors), for a model larger than
    memory that runs with `moekit.inference.offload.attach`.
    """
    path = Path(path)
    hf_config, raw = read_hf_config(path)
    tensors = _meta_tensors(_weight_files(path)) if experts_on_disk else read_hf_tensors(path)
    source = str(path)
    config = family_config_from_hf(hf_config, "per_expert", str(path / HF_CONFIG), raw)
    spec = FAMILIES[config.family]
    config = dataclasses.replace(config, hf_layout=detect_layout(spec, config, tensors, source))
    if experts_on_disk:
        experts = {
            k
            for rule in rules_for(spec, config, config.hf_layout)
            if ".experts." in rule.ours
            for k in rule.theirs
        }
        tensors.update(_read_named(_weight_files(path), [k for k in tensors if k not in experts]))
    if attn_implementation is not None:
        attention = dataclasses.replace(config.attention, implementation=attn_implementation)
        config = dataclasses.replace(config, attention=attention)
    if backend is not None:
        config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, backend=backend))
    state = _cast(hf_to_moekit(spec, config, config.hf_layout, tensors, source), dtype)
    model = _build(config, state, source)
    model.checkpoint_path = str(path)  # where offloading reads the experts back from
    return model


def hf_config_for(config: FamilyConfig) -> Any:
    """The transformers config object that describes `config`, checked by reading it back."""
    spec = family_spec(config.family, "family config")
    cls = _config_class(spec.name)
    aliases = getattr(cls, "attribute_map", {}) or {}
    kept = {
        aliases.get(k, k): _without_file_fields(v)
        for k, v in config.hf_config.items()
        if k not in _FILE_FIELDS
    }
    derived = {aliases.get(k, k): v for k, v in spec.write_config(config).items()}
    try:
        hf_config = cls(**{**kept, **derived})
    except Exception as exc:  # transformers' (strict dataclass) validation raises several types
        raise ConfigError("family", f"transformers rejects the exported {spec.config_class}: {exc}") from None
    hf_config.architectures = [spec.architecture]
    back = family_config_from_hf(hf_config, config.hf_layout, spec.config_class)
    mine = dataclasses.replace(config, hf_config={})
    theirs = dataclasses.replace(back, hf_config={}, attention=dataclasses.replace(
        back.attention, implementation=config.attention.implementation
    ), moe=dataclasses.replace(back.moe, backend=config.moe.backend))  # fmt: skip
    if mine != theirs:
        diff = [f.name for f in dataclasses.fields(mine) if getattr(mine, f.name) != getattr(theirs, f.name)]
        raise ConfigError(
            f"family.{diff[0]}",
            f"this model cannot be expressed as a {spec.config_class} (it would read back different)",
        )
    return hf_config


def _without_file_fields(value: Any) -> Any:
    """Sub-config dicts (DBRX) carry their own file fields; drop them too."""
    if isinstance(value, dict):
        return {k: _without_file_fields(v) for k, v in value.items() if k not in _FILE_FIELDS}
    return value


def _write_dir(path: Path, fill: Callable[[Path], None], overwrite: bool) -> Path:
    """Fill a temporary sibling of `path`, then rename it into place (replacing only if asked)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MoekitError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old / path.name, path)  # put the previous folder back
                old.rmdir()
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _save_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _model_state(model: FamilyModel, dtype: torch.dtype | None) -> dict[str, Tensor]:
    state = dict(model.state_dict())
    if model.config.tie_embeddings:
        state.pop("head.weight", None)
    return _cast(state, dtype)


def _require_family_model(model: Any) -> FamilyModel:
    if not isinstance(model, FamilyModel):
        raise MoekitError(
            f"expected a moekit FamilyModel (from moekit.from_hf), got {type(model).__name__}; "
            "a patched transformers model already is an HF model: use its save_pretrained"
        )
    return model


def to_hf(
    model: FamilyModel,
    path: str | os.PathLike,
    *,
    layout: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as an HF folder that `AutoModelForCausalLM.from_pretrained` loads.

    `layout`: "per_expert" (what `save_pretrained` writes by default, readable by transformers v4
    and v5) or "packed" (v5's fused expert tensors); default: the layout the model was read from.
    """
    model = _require_family_model(model)
    config = model.config
    layout = layout or config.hf_layout
    if layout not in HF_LAYOUTS:
        raise ConfigError("layout", f"got {layout!r}, expected one of {', '.join(HF_LAYOUTS)}")
    spec = family_spec(config.family, "model")
    hf_config = hf_config_for(config)
    tensors = moekit_to_hf(spec, config, layout, _model_state(model, dtype))
    hf_config.dtype = model.embed.weight.dtype if dtype is None else dtype

    def fill(tmp: Path) -> None:
        hf_config.save_pretrained(str(tmp))
        _save_safetensors(tmp / HF_WEIGHTS, tensors)

    return _write_dir(Path(path), fill, overwrite)


def save_family(model: FamilyModel, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """moekit's own checkpoint of a family model: `moekit_family.json` + `model.safetensors` of
    moekit's state dict (a tied head is stored once, as the embedding)."""
    model = _require_family_model(model)
    state = _model_state(model, None)
    document = {"format": FAMILY_FORMAT, "version": FAMILY_VERSION, "config": model.config.to_dict()}

    def fill(tmp: Path) -> None:
        write_json_atomic(tmp / FAMILY_CONFIG, document)
        _save_safetensors(tmp / FAMILY_WEIGHTS, state)

    return _write_dir(Path(path), fill, overwrite)


def load_family(path: str | os.PathLike, *, experts_on_disk: bool = False) -> FamilyModel:
    """A family model from `save_family`'s folder (eval mode); `experts_on_disk` as in `from_hf`."""
    path = Path(path)
    if path.is_dir() and not (path / FAMILY_CONFIG).is_file() and (path / HF_CONFIG).is_file():
        raise MoekitError(f"{path}: this is an HF folder, not a moekit family checkpoint; use moekit.from_hf")
    document = read_json(path / FAMILY_CONFIG, "moekit family config")
    if not isinstance(document, dict) or document.get("format") != FAMILY_FORMAT:
        raise MoekitError(f"{path / FAMILY_CONFIG}: expected format {FAMILY_FORMAT!r}")
    if document.get("version") != FAMILY_VERSION:
        raise MoekitError(
            f"{path / FAMILY_CONFIG}: version {document.get('version')!r}, "
            f"this moekit reads version {FAMILY_VERSION}"
        )
    try:
        config = FamilyConfig.from_dict(document.get("config"), "config")
    except ConfigError as exc:
        raise MoekitError(f"{path / FAMILY_CONFIG}: {exc}") from None
    family_spec(config.family, str(path / FAMILY_CONFIG))
    if experts_on_disk:
        state = _meta_tensors([path / FAMILY_WEIGHTS])
        state.update(_read_named([path / FAMILY_WEIGHTS], [k for k in state if ".experts." not in k]))
    else:
        state = load_tensors(path / FAMILY_WEIGHTS, "moekit family weights")
    model = _build(config, state, str(path / FAMILY_WEIGHTS))
    model.checkpoint_path = str(path)  # where offloading reads the experts back from
    return model


def load_any(path: str | os.PathLike) -> FamilyModel:
    """A family model from either kind of folder (moekit's own or an HF checkpoint)."""
    path = Path(path)
    if (path / FAMILY_CONFIG).is_file():
        return load_family(path)
    return from_hf(path)
