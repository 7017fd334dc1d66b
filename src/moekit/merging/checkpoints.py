"""`merge_checkpoints`: merge HF folders or moekit runs on disk into a new folder of the same kind.

Everything is checked before any tensor is merged (same kind, same architecture, same tensor names
and shapes, same tokenizer, valid parameters), HF weights are read one tensor at a time from the
safetensors files (memory: the output plus one tensor per input), and the output folder is filled
under a temporary name and renamed into place: an existing folder is never replaced.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from moekit.errors import MoekitError
from moekit.merging.api import _FUSED, _check_params, _layout, merge_state_dicts

MERGE_RECORD = "merge.json"
# tokenizer files: all inputs that have one must have the same bytes; the base's are copied
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
_COPIED_FILES = (
    *_TOKENIZER_FILES,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
# config.json entries that describe the file, not the model
_FILE_FIELDS = ("architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path")
# where each family's config keeps its routed expert count
_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def merge_checkpoints(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str,
    **params: Any,
) -> dict[str, Any]:
    """Merge fine-tuned `models` of `base` (HF folders or moekit runs, all of one kind) into `out`
    with `method` (see `merge_state_dicts` for the methods and `params`). Returns the record also
    written to `out/merge.json`. `out` must not exist."""
    from moekit.construct.api import source_kind

    base_path, model_paths, out_path = Path(base), [Path(p) for p in models], Path(out)
    if not model_paths:
        raise MoekitError("models: expected at least one fine-tuned model to merge into the base")
    if out_path.exists():
        raise MoekitError(f"{out_path}: already exists (choose a new output folder)")
    for path in (base_path, *model_paths):
        if not path.is_dir():
            raise MoekitError(f"{path}: no such folder")
    options = _check_params(method, dict(params))
    kind = source_kind(base_path)
    for path in model_paths:
        if source_kind(path) != kind:
            raise MoekitError(
                f"{path}: is not a {'an HF folder' if kind == 'hf' else 'moekit run'} like the base"
            )
    record = {
        "method": method,
        "params": {k: v for k, v in options.items() if k != "experts"},
        "base": str(base_path),
        "models": [str(p) for p in model_paths],
        "kind": kind,
    }
    if kind == "hf":
        return _merge_hf(base_path, model_paths, out_path, method, params, record)
    return _merge_runs(base_path, model_paths, out_path, method, params, record)


def expert_layout(num_experts: int | None) -> Callable[[str, Tensor], int | None]:
    """Fused expert tensors (under `experts.`, no expert index) hold `num_experts` experts along
    dim 0: (E, ...) in most families, (E*I, H) in DBRX."""

    def count(name: str, tensor: Tensor) -> int | None:
        if num_experts and tensor.dim() >= 2 and _FUSED.search(name) and tensor.shape[0] % num_experts == 0:
            return num_experts
        return None

    return count


# ---- HF folders ----


def _merge_hf(
    base: Path, models: list[Path], out: Path, method: str, params: dict[str, Any], record: dict[str, Any]
) -> dict[str, Any]:
    from safetensors import safe_open

    from moekit.interop.hf import HF_CONFIG, _weight_files, _write_dir
    from moekit.io import read_json, write_json_atomic

    config = read_json(base / HF_CONFIG, "HF config")
    for path in models:
        _require_same_config(config, read_json(path / HF_CONFIG, "HF config"), path / HF_CONFIG, base)
    _require_same_tokenizer(base, models)
    index = _hf_index(base, _weight_files(base))
    indexes = [_hf_index(path, _weight_files(path)) for path in models]
    for path, other in zip(models, indexes, strict=True):
        _require_same_tensors(index, other, path, base)
    layout = (
        _layout(params.pop("experts")) if "experts" in params else expert_layout(_hf_expert_count(config))
    )
    handles: dict[Path, Any] = {}

    def read(name: str, table: dict[str, tuple[Path, tuple[int, ...]]]) -> Tensor:
        file = table[name][0]
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        return handles[file].get_tensor(name)

    merged: dict[str, Tensor] = {}
    split = 0
    for name in index:
        tensor = read(name, index)
        split += layout(name, tensor) is not None
        inputs = [{name: read(name, table)} for table in indexes]
        merged.update(merge_state_dicts({name: tensor}, inputs, method, experts=layout, **params))
    record.update(tensors=len(merged), fused_expert_tensors=split, output=str(out))

    def fill(tmp: Path) -> None:
        from moekit.interop.hf import _save_safetensors

        _save_safetensors(tmp / "model.safetensors", merged)
        shutil.copy2(base / HF_CONFIG, tmp / HF_CONFIG)
        for name in _COPIED_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        write_json_atomic(tmp / MERGE_RECORD, record)

    _write_dir(out, fill, overwrite=False)
    return record


def _hf_index(folder: Path, files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name -> (file, shape) from the safetensors headers."""
    from safetensors import SafetensorError, safe_open

    table: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    table[name] = (file, tuple(handle.get_slice(name).get_shape()))
        except (SafetensorError, OSError) as exc:
            raise MoekitError(f"{file}: not a readable safetensors file ({exc})") from None
    if not table:
        raise MoekitError(f"{folder}: no tensors in its safetensors weights")
    return table


def _require_same_tensors(
    base: dict[str, tuple[Path, tuple[int, ...]]],
    other: dict[str, tuple[Path, tuple[int, ...]]],
    path: Path,
    base_path: Path,
) -> None:
    missing = [k for k in base if k not in other]
    if missing:
        raise MoekitError(f"{path}: tensor {missing[0]!r} of {base_path} is missing ({len(missing)} are)")
    extra = [k for k in other if k not in base]
    if extra:
        raise MoekitError(f"{path}: tensor {extra[0]!r} is not in {base_path} ({len(extra)} such tensors)")
    for name, (_, shape) in base.items():
        if other[name][1] != shape:
            raise MoekitError(f"{path}: {name} has shape {other[name][1]}, {base_path} has {shape}")


def _require_same_config(base: dict[str, Any], other: Any, where: Path, base_path: Path) -> None:
    if not isinstance(other, dict):
        raise MoekitError(f"{where}: expected a JSON object")
    a = {k: v for k, v in base.items() if k not in _FILE_FIELDS}
    b = {k: v for k, v in other.items() if k not in _FILE_FIELDS}
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            raise MoekitError(
                f"{where}: {key!r} is {b.get(key)!r}, {base_path} has {a.get(key)!r} "
                "(merging needs one architecture)"
            )


def _require_same_tokenizer(base: Path, models: list[Path]) -> None:
    for name in _TOKENIZER_FILES:
        reference = base / name
        for path in models:
            mine = path / name
            if reference.is_file() and mine.is_file() and reference.read_bytes() != mine.read_bytes():
                raise MoekitError(f"{mine}: differs from {reference} (the models must share one tokenizer)")


def _hf_expert_count(config: dict[str, Any]) -> int | None:
    for scope in (config, config.get("ffn_config") or {}, config.get("text_config") or {}):
        for key in _EXPERT_COUNT_FIELDS:
            value = scope.get(key) if isinstance(scope, dict) else None
            if isinstance(value, int) and value > 0:
                return value
    return None


# ---- moekit runs ----


def _merge_runs(
    base: Path, models: list[Path], out: Path, method: str, params: dict[str, Any], record: dict[str, Any]
) -> dict[str, Any]:
    from moekit.construct.lm import load_run_model
    from moekit.interop.hf import _write_dir
    from moekit.io import write_json_atomic
    from moekit.train.checkpoint import save_checkpoint

    model, state = load_run_model(base)
    data = state.get("config", {}).get("data", {})
    others = []
    for path in models:
        other, other_state = load_run_model(path)
        mine, theirs = model.config.to_dict(), other.config.to_dict()
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                raise MoekitError(
                    f"{path}: model.{key} is {theirs.get(key)!r}, {base} has {mine.get(key)!r} "
                    "(merging needs one architecture)"
                )
        other_data = other_state.get("config", {}).get("data", {})
        for key in ("tokenizer", "bpe_vocab_size"):
            if data.get(key) != other_data.get(key):
                raise MoekitError(
                    f"{path}: data.{key} is {other_data.get(key)!r}, {base} has {data.get(key)!r} "
                    "(the models must share one tokenizer)"
                )
        others.append(other.state_dict())
    moe = model.config.moe
    if "experts" in params:
        layout = _layout(params.pop("experts"))
    else:
        layout = expert_layout(moe.router.num_experts if moe else None)
    base_state = model.state_dict()
    merged = merge_state_dicts(base_state, others, method, experts=layout, **params)
    model.load_state_dict(merged)
    record.update(
        tensors=len(merged),
        fused_expert_tensors=sum(layout(k, v) is not None for k, v in base_state.items()),
        output=str(out),
    )
    new_state = {
        "config": dict(state.get("config", {})),
        "step": 0,
        "tokens_seen": 0,
        "merged_from": [str(base), *map(str, models)],
        "domains": state.get("domains", []),
    }

    def fill(tmp: Path) -> None:
        save_checkpoint(tmp / "checkpoints" / "step-000000", model, None, new_state)
        write_json_atomic(tmp / MERGE_RECORD, record)

    _write_dir(out, fill, overwrite=False)
    return record
