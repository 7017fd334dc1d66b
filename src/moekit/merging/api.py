"""`merge_state_dicts`: merge fine-tuned copies of one base model into one model, tensor by tensor.

Fused expert tensors (one tensor holding every expert, e.g. HF's `mlp.experts.gate_up_proj` of
shape (E, 2I, H)) are merged expert by expert: each expert's slice is its own unit, so a TIES
density or a PCB ratio keeps that fraction *of every expert*, never one global threshold that a
few large-update experts could exhaust. mergekit thresholds the fused tensor at once.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from moekit.errors import ConfigError, require_choice, require_int
from moekit.merging import methods as m

METHODS = ("ta", "ties", "dare_ta", "dare_ties", "pcb")

# What each method reads, with its default. `weights` (one per model, default 1) and `experts`
# (the fused-expert layout) apply to every method.
_PARAMS: dict[str, dict[str, Any]] = {
    "ta": {"lam": 1.0},
    "ties": {"lam": 1.0, "density": 0.2},
    "dare_ta": {"lam": 1.0, "drop_rate": 0.9, "seed": 0},
    "dare_ties": {"lam": 1.0, "drop_rate": 0.9, "seed": 0},
    "pcb": {"lam": 1.0, "ratio": 0.1},
}
_COMMON = ("weights", "experts")

# A fused expert tensor: an `experts` path component not followed by an expert index.
_FUSED = re.compile(r"(^|\.)experts\.(?!\d+\.)")

ExpertLayout = Mapping[str, int] | Callable[[str, Tensor], int | None] | None


def fused_expert_count(name: str, tensor: Tensor) -> int | None:
    """The default layout: a 3-D tensor (or a 2-D bias) under `experts.` with no expert index holds
    shape[0] experts.

    This is HF's fused layout (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj`, gpt-oss'
    `experts.down_proj_bias` (E, H)) and moekit's own (`experts.w_in`, `experts.b_in`). Per-expert
    tensors (`experts.3.w1.weight`) are units already. DBRX stacks its experts as (E*I, H), which
    the tensor alone does not reveal: pass `experts={name: E}` (`merge_checkpoints` does).
    """
    if not _FUSED.search(name):
        return None
    leaf = name.rsplit(".", 1)[-1]
    if tensor.dim() >= 3 or (tensor.dim() == 2 and (leaf.endswith("bias") or leaf.startswith("b_"))):
        return int(tensor.shape[0])
    return None


def tensor_seed(seed: int, name: str) -> int:
    """The DARE seed of one tensor: the run's seed and the tensor's name, so that a tensor's mask
    does not depend on which other tensors are merged or in what order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def merge_state_dicts(
    base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], method: str, **params: Any
) -> dict[str, Tensor]:
    """Merge `finetuned` models (same names and shapes as `base`) into one state dict.

    method: "ta" (task arithmetic), "ties", "dare_ta" (DARE then task arithmetic, mergekit's
    dare_linear), "dare_ties" (DARE then TIES' sign election and disjoint mean) or "pcb".
    params (any other name is an error):
      weights:   one number per fine-tuned model (default 1 each); TA and PCB scale tau_i by it,
                 TIES takes the weighted disjoint mean.
      lam:       lambda, the scale of the merged task vector (default 1): theta = base + lam * tau_m.
      density:   TIES, fraction of each unit's entries kept by magnitude, in (0, 1] (default 0.2).
      drop_rate: DARE, probability p of dropping an entry, in [0, 1) (default 0.9); kept entries
                 are rescaled by 1/(1-p).
      seed:      DARE, an integer; each tensor's generator is seeded from it and the tensor's name.
      ratio:     PCB, fraction of each unit's entries kept by balancing score, in (0, 1] (default 0.1).
      experts:   the fused-expert layout: a mapping name -> number of experts along dim 0, or a
                 function (name, tensor) -> count or None; default `fused_expert_count`. Each
                 expert's slice is thresholded on its own.
    Non-floating tensors (integer buffers) must be equal in every model and are copied.
    """
    options = _check_params(method, params)
    models = _check_inputs(base, finetuned)
    weights = _check_weights(options["weights"], len(models))
    layout = _layout(options["experts"])
    merged: dict[str, Tensor] = {}
    for name, reference in base.items():
        if reference.numel() == 0:
            merged[name] = reference.clone()
            continue
        if not reference.is_floating_point():
            _require_equal(name, reference, models)
            merged[name] = reference.clone()
            continue
        experts = layout(name, reference)
        if experts is not None and (experts < 1 or reference.shape[0] % experts != 0):
            raise ConfigError(
                "experts", f"{name}: {experts} experts do not divide dim 0 of shape {tuple(reference.shape)}"
            )
        merged[name] = _merge_tensor(
            name, reference, [model[name] for model in models], weights, experts, method, options
        )
    return merged


def _merge_tensor(
    name: str,
    base: Tensor,
    tensors: list[Tensor],
    weights: list[float],
    experts: int | None,
    method: str,
    options: dict[str, Any],
) -> Tensor:
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    reference = base.to(work)
    units = experts or 1
    deltas = torch.stack([m.task_vector(t.to(work), reference) for t in tensors]).reshape(
        len(tensors), units, -1
    )
    w = torch.tensor(weights, dtype=work)
    if method in ("dare_ta", "dare_ties"):
        generator = torch.Generator().manual_seed(tensor_seed(options["seed"], name))
        deltas = m.dare_drop(deltas, options["drop_rate"], generator)
    if method in ("ta", "dare_ta"):
        merged = m.weighted_sum(deltas, w)
    elif method in ("ties", "dare_ties"):
        if method == "ties":
            deltas = m.trim_to_density(deltas, options["density"])
        weighted = deltas * w.view(-1, 1, 1)
        merged = m.disjoint_mean(weighted, w, m.elect_sign(weighted))
    else:
        merged = m.pcb_merge_unit(deltas, w, options["ratio"])
    return (reference + options["lam"] * merged.reshape(base.shape)).to(base.dtype)


def _check_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    require_choice("method", method, METHODS)
    known = _PARAMS[method]
    for key in params:
        if key not in known and key not in _COMMON:
            accepted = ", ".join([*known, *_COMMON])
            raise ConfigError(key, f"not a parameter of method {method!r} (it takes {accepted})")
    options = {**known, "weights": None, "experts": None, **params}
    _require_finite("lam", options["lam"])
    if "density" in known:
        _require_fraction("density", options["density"], low_open=True, high_open=False)
    if "drop_rate" in known:
        _require_fraction("drop_rate", options["drop_rate"], low_open=False, high_open=True)
    if "ratio" in known:
        _require_fraction("ratio", options["ratio"], low_open=True, high_open=False)
    if "seed" in known:
        require_int("seed", options["seed"], minimum=0)
    return options


def _require_finite(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(field, f"got {value!r}, expected a finite number")


def _require_fraction(field: str, value: Any, *, low_open: bool, high_open: bool) -> None:
    _require_finite(field, value)
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(field, f"got {value}, expected a number in {interval}")


def _check_inputs(
    base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]]
) -> list[Mapping[str, Tensor]]:
    if not isinstance(base, Mapping) or not base:
        raise ConfigError("base", "expected a non-empty state dict (name -> tensor)")
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence) or not finetuned:
        raise ConfigError("finetuned", "expected a non-empty list of state dicts")
    for i, model in enumerate(finetuned):
        field = f"finetuned[{i}]"
        if not isinstance(model, Mapping):
            raise ConfigError(field, f"got {type(model).__name__}, expected a state dict")
        missing = [k for k in base if k not in model]
        extra = [k for k in model if k not in base]
        if missing:
            raise ConfigError(
                field, f"tensor {missing[0]!r} is missing ({len(missing)} of the base's tensors are)"
            )
        if extra:
            raise ConfigError(field, f"tensor {extra[0]!r} is not in the base ({len(extra)} such tensors)")
        for name, tensor in base.items():
            other = model[name]
            if not isinstance(other, Tensor) or not isinstance(tensor, Tensor):
                raise ConfigError(field, f"{name}: expected a tensor")
            if other.shape != tensor.shape:
                raise ConfigError(
                    field, f"{name}: shape {tuple(other.shape)} differs from the base's {tuple(tensor.shape)}"
                )
            if other.is_floating_point() != tensor.is_floating_point():
                raise ConfigError(
                    field, f"{name}: dtype {other.dtype} does not match the base's {tensor.dtype}"
                )
            if other.is_floating_point() and not bool(torch.isfinite(other).all()):
                raise ConfigError(field, f"{name}: has NaN or infinite values")
    return list(finetuned)


def _check_weights(weights: Any, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != n:
        raise ConfigError("weights", f"got {weights!r}, expected a list of {n} numbers (one per model)")
    for i, weight in enumerate(weights):
        _require_finite(f"weights[{i}]", weight)
    return [float(w) for w in weights]


def _layout(experts: ExpertLayout) -> Callable[[str, Tensor], int | None]:
    if experts is None:
        return fused_expert_count
    if isinstance(experts, Mapping):
        return lambda name, tensor: experts.get(name)
    if callable(experts):
        return experts
    raise ConfigError(
        "experts", f"got {type(experts).__name__}, expected a mapping name -> count or a function"
    )


def _require_equal(name: str, reference: Tensor, models: list[Mapping[str, Tensor]]) -> None:
    for i, model in enumerate(models):
        if not torch.equal(model[name], reference):
            raise ConfigError(f"finetuned[{i}]", f"{name}: a non-floating tensor differs from the base's")
