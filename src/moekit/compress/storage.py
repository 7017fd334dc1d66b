"""moekit's packed format for quantized models: the routed experts as packed integer codes with
group-wise float16 scales and integer zero points, everything else as it was, loaded into a model
whose MoE layers hold `QuantizedExperts` (only the packed experts resident).

A folder of:
- `quantized.json`: format and version, the model kind (`family`: a `moekit.from_hf` family; `lm`:
  moekit's own LM) and its config, the run config (LM) or the HF special token ids (family),
  and per MoE layer its name, bits per expert and group size;
- `dense.safetensors`: every other tensor (moekit names; a tied head stored once);
- `experts.quant.safetensors`: per MoE layer `{layer}.experts.codes_in|codes_out` (uint8 bit
  streams), `scales_in|scales_out` (F16 [E, rows, groups]), `zeros_in|zeros_out` (U8);
- `tokenizer.json` when the source had one, and `compress_report.json`.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, MoekitError
from moekit.experts.quantized import PARTS, QuantizedExperts
from moekit.io import check_tensor_names, load_tensors, read_json, save_tensors_atomic, write_json_atomic

META_FILE = "quantized.json"
DENSE_FILE = "dense.safetensors"
EXPERTS_FILE = "experts.quant.safetensors"
FORMAT = "moekit-quantized-experts"
VERSION = 1
QUANTIZED_TENSORS = tuple(f"{kind}_{part}" for part in PARTS for kind in ("codes", "scales", "zeros"))
_ALIGNMENT = 64  # bytes: as `moekit.interop.hf._build`, own aligned storage for every tensor


def is_packed_directory(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def model_kind(model: nn.Module) -> str:
    from moekit.interop.model import FamilyModel

    return "family" if isinstance(model, FamilyModel) else "lm"


def expert_tensors(name: str, experts: QuantizedExperts) -> dict[str, Tensor]:
    """One layer's packed tensors under their model names, scales as float16 (as the file keeps
    them)."""
    out = {}
    for key in QUANTIZED_TENSORS:
        tensor = getattr(experts, key)
        out[f"{name}.experts.{key}"] = tensor.view(torch.float16) if key.startswith("scales") else tensor
    return out


def dense_tensors(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The model's tensors other than the routed experts' weights (tied ones once), floating ones
    cast to `dtype` (the router's selection bias stays fp32)."""
    from moekit.analysis.recorder import find_moe_layers
    from moekit.train.checkpoint import model_tensors

    skip = set()
    for name, _ in find_moe_layers(model):
        skip |= {f"{name}.experts.w_in", f"{name}.experts.w_out"}
        skip |= {f"{name}.experts.{k}" for k in QUANTIZED_TENSORS}
    out = {}
    for key, tensor in model_tensors(model).items():
        if key in skip:
            continue
        cast = dtype is not None and tensor.is_floating_point() and not key.endswith("selection_bias")
        out[key] = tensor.detach().to(dtype) if cast else tensor.detach()
    return out


def layer_entries(model: nn.Module) -> list[dict[str, Any]]:
    from moekit.analysis.recorder import find_moe_layers

    entries = []
    for name, moe in find_moe_layers(model):
        experts = moe.experts
        if not isinstance(experts, QuantizedExperts):
            raise MoekitError(f"{name}: the experts are not quantized ({type(experts).__name__})")
        entries.append({"name": name, "bits": list(experts.bits), "group_size": experts.group_size})
    return entries


def _build(kind: str, config_data: dict[str, Any], layers: list[dict[str, Any]], source: str) -> nn.Module:
    """The model skeleton on the meta device with `QuantizedExperts` in every MoE layer."""
    from moekit.analysis.recorder import find_moe_layers

    try:
        if kind == "family":
            from moekit.interop.model import FamilyConfig, FamilyModel

            config = FamilyConfig.from_dict(config_data, "config")
            cls: Any = FamilyModel
        elif kind == "lm":
            from moekit.models.lm import LanguageModel, LMConfig

            config = LMConfig.from_dict(config_data)
            cls = LanguageModel
        else:
            raise MoekitError(f"{source}: kind {kind!r}, expected 'family' or 'lm'")
    except ConfigError as exc:
        raise MoekitError(f"{source}: {exc}") from None
    scratch: dict = {}  # one set of dequantization buffers for all layers
    with torch.device("meta"):
        model = cls(config)
        moe_layers = find_moe_layers(model)
        if len(moe_layers) != len(layers):
            raise MoekitError(f"{source}: {len(layers)} quantized layers, the config has {len(moe_layers)}")
        for (name, moe), entry in zip(moe_layers, layers, strict=True):
            if entry.get("name") != name:
                raise MoekitError(f"{source}: layer {entry.get('name')!r} where the model has {name!r}")
            old = moe.experts
            try:
                moe.experts = QuantizedExperts(
                    old.num_experts,
                    old.hidden_size,
                    old.ff_size,
                    old.activation,
                    entry["bits"],
                    entry["group_size"],
                    bias=getattr(old, "b_in", None) is not None,
                    scratch=scratch,
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise MoekitError(f"{source}: layer {name}: {exc}") from None
    return model


def _aliases(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (a tied head), first name first."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    for first, *others in groups:
        tensor = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, tensor)


def assemble(
    kind: str, config: dict[str, Any], layers: list[dict[str, Any]], state: dict[str, Tensor], source: str
) -> nn.Module:
    """A model (eval mode) holding exactly `state` (dense tensors + packed experts, model names)."""
    model = _build(kind, config, layers, source)
    aliases = _aliases(model)
    tied = {name for names in aliases for name in names[1:]}
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    check_tensor_names(source, expected, state)
    for name, tensor in state.items():
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape) or (
            not want.is_floating_point() and tensor.dtype != want.dtype
        ):
            raise MoekitError(
                f"{source}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"the model expects {want.dtype} {tuple(want.shape)}"
            )
    state = {k: v if v.data_ptr() % _ALIGNMENT == 0 else v.clone() for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    _retie(model, aliases)
    return model.eval()


def with_quantized_experts(model: nn.Module, experts: list[QuantizedExperts]) -> nn.Module:
    """A new model: `model`'s dense tensors (shared, not copied) with `experts[i]`'s packed
    tensors in its MoE layers in place of the float experts."""
    from moekit.analysis.recorder import find_moe_layers

    layers = find_moe_layers(model)
    state = dense_tensors(model)
    entries = []
    for (name, _), quantized in zip(layers, experts, strict=True):
        state.update({f"{name}.experts.{k}": getattr(quantized, k) for k in QUANTIZED_TENSORS})
        entries.append({"name": name, "bits": list(quantized.bits), "group_size": quantized.group_size})
    return assemble(model_kind(model), model.config.to_dict(), entries, state, "quantized model")


def save_packed(
    model: nn.Module, directory: Path, dtype: torch.dtype | None = None, extra: dict[str, Any] | None = None
) -> None:
    """Write `model` (MoE layers holding `QuantizedExperts`) into the existing empty `directory`;
    `extra` goes into quantized.json (run config, special token ids)."""
    from moekit.analysis.recorder import find_moe_layers

    directory = Path(directory)
    packed: dict[str, Tensor] = {}
    for name, moe in find_moe_layers(model):
        packed.update(expert_tensors(name, moe.experts))
    document = {
        "format": FORMAT,
        "version": VERSION,
        "kind": model_kind(model),
        "config": model.config.to_dict(),
        "layers": layer_entries(model),
        **(extra or {}),
    }
    save_tensors_atomic(directory / DENSE_FILE, dense_tensors(model, dtype))
    save_tensors_atomic(directory / EXPERTS_FILE, packed)
    write_json_atomic(directory / META_FILE, document)


def read_meta(path: Path) -> dict[str, Any]:
    path = Path(path)
    document = read_json(path / META_FILE, "quantized model description")
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise MoekitError(f"{path / META_FILE}: expected format {FORMAT!r}")
    if document.get("version") != VERSION:
        raise MoekitError(
            f"{path / META_FILE}: version {document.get('version')!r}, this moekit reads version {VERSION}"
        )
    for key, kind in (("kind", str), ("config", dict), ("layers", list)):
        if not isinstance(document.get(key), kind):
            raise MoekitError(f"{path / META_FILE}: missing or malformed {key!r}")
    return document


def load_packed(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model, quantized.json) of a packed folder; the experts stay packed in memory."""
    path = Path(path)
    document = read_meta(path)
    state = load_tensors(path / DENSE_FILE, "dense weights")
    for key, tensor in load_tensors(path / EXPERTS_FILE, "packed experts").items():
        state[key] = tensor.view(torch.int16) if key.rsplit(".", 1)[-1].startswith("scales") else tensor
    model = assemble(document["kind"], document["config"], document["layers"], state, str(path))
    return model, document


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model holds: parameters + buffers (each tensor once), of which routed experts,
    and the dequantization buffers allocated so far."""
    from moekit.analysis.recorder import find_moe_layers

    def size(tensors: Any) -> int:
        seen, total = set(), 0
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    experts = [moe.experts for _, moe in find_moe_layers(model)]
    return {
        "parameters_and_buffers": size(list(model.parameters()) + list(model.buffers())),
        "routed_experts": size([t for e in experts for t in list(e.parameters()) + list(e.buffers())]),
        "dequantize_buffers": size(
            [t for e in experts if isinstance(e, QuantizedExperts) for t in e.scratch_buffers()]
        ),
    }


def rss_bytes() -> int:
    """The process's resident set size now (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def packed_eos(path: Path) -> Any:
    """The end-of-sequence id(s) generation stops at: the HF config's (family), else None (an LM's
    tokenizer knows its own)."""
    tokens = read_meta(path).get("special_tokens")
    return tokens.get("eos_token_id") if isinstance(tokens, dict) else None


def load_for_use(path: Path) -> dict[str, Any]:
    """What `moekit.analysis.cli.LoadedModel` holds, from a packed folder: model, tokenizer,
    data_config, layout, max_seq_len, kind."""
    from moekit.analysis.data import HFTokenizer, checkpoint_tokenizer

    path = Path(path)
    model, document = load_packed(path)
    if document["kind"] == "family":
        tokenizer = HFTokenizer(path)
        tokens = document.get("special_tokens") or {}
        eos = _first_id(tokens.get("eos_token_id"))
        tokenizer.eos_id = 0 if eos is None else eos
        bos, pad = _first_id(tokens.get("bos_token_id")), _first_id(tokens.get("pad_token_id"))
        tokenizer.bos_id = tokenizer.eos_id if bos is None else bos
        tokenizer.pad_id = tokenizer.eos_id if pad is None else pad
        return dict(
            model=model, tokenizer=tokenizer, data_config={}, layout="padded", max_seq_len=None, kind="hf"
        )
    run_config = document.get("run_config") or {}
    data_config = run_config.get("data") if isinstance(run_config.get("data"), dict) else {}
    tokenizer = checkpoint_tokenizer(path, data_config)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise MoekitError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{model.config.vocab_size}"
        )
    return dict(
        model=model,
        tokenizer=tokenizer,
        data_config=data_config,
        layout="packed",
        max_seq_len=model.config.max_seq_len,
        kind="moekit",
    )


def packed_run_state(path: Path) -> dict[str, Any]:
    """The run state (config with model and data, step) of a packed moekit LM, as a checkpoint's
    state.json gives it, for `moekit eval`."""
    document = read_meta(path)
    if document["kind"] != "lm":
        raise MoekitError(
            f"{path}: a packed {document['config'].get('family', document['kind'])} model; moekit eval "
            "evaluates moekit LMs on their run's corpus (use moekit analyze or moekit generate)"
        )
    run_config = document.get("run_config")
    if not isinstance(run_config, dict):
        raise MoekitError(f"{Path(path) / META_FILE}: missing run_config")
    return {"config": run_config, "step": document.get("step")}
