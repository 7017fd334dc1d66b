"""`compress(src, recipe, calib, out)`: load, check, calibrate, compress, evaluate, write.

Everything that can be wrong with the inputs (the recipe, the model, the target count, the output
folder, scipy) is checked before the calibration pass; the output folder is assembled in a
temporary sibling and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.analysis.recorder import find_moe_layers
from moekit.compress.calibrate import Calibration, calibrate, packed_experts
from moekit.compress.evaluate import compare
from moekit.compress.prune import resolve_keep
from moekit.compress.recipe import Recipe
from moekit.compress.surgery import with_num_experts
from moekit.errors import MoekitError
from moekit.io import write_json_atomic

REPORT_FILE = "compress_report.json"
PACKED_FILE = "experts.quant.safetensors"


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def check_model(model: nn.Module, recipe: Recipe) -> None:
    """Refuse what cannot be compressed before any work: no MoE layers, non-packed experts, a
    target below top-k, a method needing scipy without it."""
    layers = find_moe_layers(model)
    for name, moe in layers:
        packed_experts(name, moe)
    spec = layers[0][1].config.router
    if recipe.method in ("prune", "merge", "premoe"):
        from moekit.compress.prune import resolve_counts

        section = getattr(recipe, recipe.method)
        counts = resolve_counts(section.keep, spec, len(layers), f"{recipe.method}.keep")
        count = (
            max(counts)
            if counts is not None
            else resolve_keep(section.keep, spec.num_experts, spec.top_k, f"{recipe.method}.keep")
        )
        if recipe.method == "prune" and recipe.prune.padding == "mask":
            from moekit.compress.padding import padding_mode

            if padding_mode(model)[0] != "mask":
                raise MoekitError(
                    "prune.padding: mask needs a router bias or selection bias to mask padding experts; "
                    "this model's router has neither (use restore)"
                )
        try:
            with_num_experts(model.config, count)
        except ValueError as exc:
            raise MoekitError(
                f"{recipe.method}.keep: {count} experts per layer do not fit the router ({exc})"
            ) from None
    if recipe.method == "premoe":
        from moekit.routing.override import check_overridable

        for index, (_, moe) in enumerate(layers):
            check_overridable(moe, index)  # the masks are applied as routing overrides
    if recipe.method == "merge":
        from moekit.compress.merge import check_rank

        for name, moe in layers:
            experts = packed_experts(name, moe)
            check_rank(recipe.merge.rank, experts.hidden_size, experts.ff_size)
    needs_scipy = (
        recipe.method == "merge"
        or (recipe.method == "prune" and recipe.prune.score == "stun")
        or (recipe.method == "quantize" and recipe.quantize.mean_bits is not None)
    )
    if needs_scipy:
        try:
            import scipy  # noqa: F401
        except ImportError:
            raise MoekitError(
                f"{recipe.method}: this method needs scipy: pip install 'moekit[compress]'"
            ) from None


def apply(
    model: nn.Module, calibration: Calibration, recipe: Recipe
) -> tuple[nn.Module, list[Tensor], dict[str, Any]]:
    """The compressed model, per layer the map original expert -> compressed expert (-1 removed),
    and what was done (for the report)."""
    from moekit.compress.quantize_model import super_expert_mask

    num = calibration.layers[0].num_experts
    if recipe.method == "prune":
        from moekit.compress.prune import prune

        p = recipe.prune
        protect = super_expert_mask(calibration) if p.protect_super_experts else None
        result = prune(model, calibration, p.score, p.keep, protect, p.allocation, p.padding)
        positions = [k.tolist() for k in result.keep] if result.padding is None else result.padding.positions
        maps = []
        for layout in positions:
            m = torch.full((num,), -1, dtype=torch.long)
            for position, expert in enumerate(layout):
                if expert >= 0:
                    m[expert] = position
            maps.append(m)
        removed = [sorted(set(range(num)) - set(k.tolist())) for k in result.keep]
        details = {"removed": removed, "scores": [s.tolist() for s in result.scores]}
        if result.padding is not None:
            layers = result.padding.layers
            details["padding"] = {
                "mode": result.padding.mode,
                "experts_kept": [len(layer["kept"]) for layer in layers],
                "layers": layers,
                "padding_bytes": sum(layer["padding_bytes"] for layer in layers),
            }
        return result.model, maps, details
    if recipe.method == "merge":
        from moekit.compress.merge import merge

        m = recipe.merge
        result = merge(model, calibration, m.keep, m.align, m.method, m.rank)
        groups = [
            [torch.nonzero(lab == c).flatten().tolist() for c in range(int(lab.max()) + 1)]
            for lab in result.labels
        ]
        return result.model, result.labels, {"merged": groups}
    from moekit.compress.quantize_model import quantize_model

    result = quantize_model(model, calibration, recipe.quantize)
    maps = [torch.arange(num) for _ in calibration.layers]
    flat = [b for row in result.bits for b in row]
    details = {
        "bits": result.bits,
        "mean_bits": sum(flat) / len(flat),
        "protected_super_experts": result.protected,
        "expert_bytes_before": result.bytes_before,
        "expert_bytes_packed": result.bytes_after,
        "packed": result.packed,
        "quantized_experts": result.experts,
    }
    return result.model, maps, details


def load_source(src: Path) -> Any:
    from moekit.analysis.cli import LoadedModel

    return LoadedModel(Path(src))


def _special_tokens(loaded: Any) -> dict[str, Any]:
    """The HF config's eos/bos/pad ids (a packed folder has no HF config.json to read them from)."""
    from moekit.io import read_json

    config = read_json(Path(loaded.path) / "config.json", "HF config")
    keys = ("eos_token_id", "bos_token_id", "pad_token_id")
    return {k: config.get(k) for k in keys} if isinstance(config, dict) else {}


def _write_packed(loaded: Any, model: nn.Module, staging: Path, dtype: torch.dtype) -> None:
    """`model` (packed experts) in moekit's packed format, with what loading it needs to
    tokenise: the source's tokenizer.json, and its HF special tokens or its run config."""
    from moekit.compress.storage import save_packed
    from moekit.interop.model import FamilyModel

    staging.mkdir(parents=True)
    if isinstance(model, FamilyModel):
        extra = {"special_tokens": _special_tokens(loaded)}
        tokenizer = Path(loaded.path) / "tokenizer.json"
    else:
        from moekit.train.checkpoint import read_checkpoint_state, resolve_checkpoint

        source = resolve_checkpoint(Path(loaded.path))
        state = read_checkpoint_state(source)
        config = dict(state.get("config", {}))
        config["model"] = model.config.to_dict()
        extra = {"run_config": config, "step": state.get("step", 0)}
        tokenizer = next(
            (d / "tokenizer.json" for d in (source, source.parent, source.parent.parent)
             if (d / "tokenizer.json").is_file()),
            Path("/nonexistent"),
        )  # fmt: skip
    save_packed(model, staging, dtype, extra)
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, staging / "tokenizer.json")


def _write(
    loaded: Any, model: nn.Module, staging: Path, packed: dict[str, Tensor] | None, dtype: torch.dtype
) -> None:
    """The compressed model into `staging`: an HF folder for a `from_hf` family, a moekit
    checkpoint for moekit's own LM (it has no HF architecture)."""
    from moekit.interop.model import FamilyModel

    if isinstance(model, FamilyModel):
        from moekit.interop.hf import to_hf

        to_hf(model, staging, overwrite=True, dtype=dtype)
        tokenizer = Path(loaded.path) / "tokenizer.json"
    else:
        from moekit.train.checkpoint import (
            model_tensors,
            read_checkpoint_state,
            resolve_checkpoint,
            write_checkpoint,
        )

        source = resolve_checkpoint(Path(loaded.path))
        state = read_checkpoint_state(source)
        config = dict(state.get("config", {}))
        config["model"] = model.config.to_dict()
        write_checkpoint(
            staging / "compressed", model_tensors(model), {}, {"config": config, "step": state.get("step", 0)}
        )
        tokenizer = next(
            (
                d / "tokenizer.json"
                for d in (source, source.parent, source.parent.parent)
                if (d / "tokenizer.json").is_file()
            ),
            Path("/nonexistent"),
        )
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, staging / "tokenizer.json")
    if packed:
        from moekit.io import save_tensors_atomic

        save_tensors_atomic(staging / PACKED_FILE, packed)


def compress(
    src: str | os.PathLike, recipe: Recipe, calib: str, out: str | os.PathLike, *, overwrite: bool = False
) -> dict[str, Any]:
    """Compress the model at `src` by `recipe` on calibration data `calib` ('corpus', 'sample',
    'builtin', a folder or file of text) and write it to `out`; returns the report."""
    from moekit.analysis.data import analysis_batches

    out = Path(out)
    if out.exists() and not overwrite:
        raise MoekitError(f"{out}: already exists (pass --overwrite to replace it)")
    started = time.perf_counter()
    loaded = load_source(Path(src))
    source_dtype = next(loaded.model.parameters()).dtype
    scale = torch.finfo(source_dtype).bits / 32  # bytes are reported in the source dtype
    model = loaded.model.float().eval()  # calibration and compression arithmetic in fp32 and up
    check_model(model, recipe)
    cal, ev = recipe.calibration, recipe.evaluation
    seq_len = cal.resolved_seq_len(loaded.max_seq_len, f"the model {src}")
    data = analysis_batches(
        calib, loaded.tokenizer, batch_size=cal.batch_size, seq_len=seq_len,
        num_batches=cal.batches + ev.batches, layout=loaded.layout, data_config=loaded.data_config,
    )  # fmt: skip
    if recipe.method == "premoe" and len(data.domain_names) < 2:
        raise MoekitError(
            f"{calib}: premoe needs calibration text of at least two domains, got "
            f"{len(data.domain_names)} ({', '.join(data.domain_names) or 'none'})"
        )
    if len(data.batches) < cal.batches + ev.batches:
        raise MoekitError(
            f"{calib}: only {len(data.batches)} batches of data, the recipe needs "
            f"calibration.batches + evaluation.batches = {cal.batches + ev.batches}"
        )
    held_out = data.batches[cal.batches :]
    torch.manual_seed(0)
    with torch.no_grad():
        calibration = calibrate(
            model,
            data.batches[: cal.batches],
            hessians=recipe.method == "quantize",
            min_tokens=cal.min_tokens,
        )
        calibrated = time.perf_counter()
        masks = None
        if recipe.method == "premoe":
            from moekit.compress.premoe import compress_premoe

            spec = find_moe_layers(model)[0][1].config.router
            count = resolve_keep(recipe.premoe.keep, spec.num_experts, spec.top_k, "premoe.keep")
            compressed, positions, masks, details = compress_premoe(
                model,
                data.batches[: cal.batches],
                data.domain_names,
                count,
                recipe.premoe.window,
                recipe.premoe.score,
            )
            maps = []
            for layout in positions:
                m = torch.full((spec.num_experts,), -1, dtype=torch.long)
                for position, expert in enumerate(layout):
                    if expert >= 0:
                        m[expert] = position
                maps.append(m)
        else:
            compressed, maps, details = apply(model, calibration, recipe)
        compressed_at = time.perf_counter()
        if "padding" in details:  # bytes in the source dtype, as the report's other byte counts
            for layer in details["padding"]["layers"]:
                layer["padding_bytes"] = int(layer["padding_bytes"] * scale)
            layers = details["padding"]["layers"]
            details["padding"]["padding_bytes"] = sum(x["padding_bytes"] for x in layers)
        packed_storage = recipe.method == "quantize" and recipe.quantize.storage == "packed"
        if packed_storage:  # evaluate what is written: the model holding only the packed experts
            from moekit.compress.storage import resident_bytes, with_quantized_experts

            compressed = with_quantized_experts(compressed, details["quantized_experts"])
            details["resident_bytes_float32"] = {
                "float_model": resident_bytes(model)["parameters_and_buffers"],
                "packed_model": resident_bytes(compressed)["parameters_and_buffers"],
            }
        from moekit.compress.evaluate import reference

        ref = reference(model, held_out, data.domain_names)
        quality = compare(ref, compressed, held_out, data.domain_names, maps)
        if masks is not None:
            from moekit.compress.premoe import evaluate_masks

            masked = evaluate_masks(ref, compressed, masks, held_out, data.domain_names, maps)
            details["premoe"].update(masked)
    packed = details.pop("packed", None)
    details.pop("quantized_experts", None)
    report = {
        "source": str(src),
        "family": getattr(model.config, "family", "moekit"),
        "recipe": recipe.to_dict(),
        "calibration": {
            "data": data.description,
            **calibration.coverage(cal.min_tokens),
            "batches": calibration.meta["batches"],
            "seq_len": seq_len,
        },
        "experts_per_layer": {
            "before": calibration.layers[0].num_experts,
            "after": compressed.moe_layers[0].experts.num_experts,
        },
        "bytes_before": int(model_bytes(model) * scale),
        "bytes_after": int(model_bytes(compressed) * scale)
        if packed is None
        else int((model_bytes(model) - details["expert_bytes_before"]) * scale)
        + details["expert_bytes_packed"],
        **quality,
        **details,
        "seconds": {"calibrate": calibrated - started, "compress": compressed_at - calibrated},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        staging = staging_root / "out"
        if packed_storage:
            _write_packed(loaded, compressed, staging, source_dtype)
        else:
            _write(loaded, compressed, staging, packed, source_dtype)
        if masks is not None:
            masks.save(staging)
        write_json_atomic(staging / REPORT_FILE, report)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return report
