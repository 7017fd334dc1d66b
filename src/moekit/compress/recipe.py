"""Compression recipes: YAML files validated field by field before any work starts.

method: prune                 # prune | merge | quantize | premoe
prune: {score: reap, keep: 0.5, protect_super_experts: true}
                              # keep: [6, 4, ...] per MoE layer, or allocation: global (one budget
                              # shared by saliency); different counts are padded (padding: mask | restore)
merge: {keep: 0.5, align: true}  # method: hc_smoe (average) | sub_moe (subspace, rank: r)
quantize: {algorithm: gptq, hessian: affinity, group_size: 32, bits: 4}
                              # or mean_bits: 2.5, choices: [2, 3, 4, 8] (MC-MoE allocation)
                              # storage: fake (float weights, default) | packed (moekit's packed form)
premoe: {keep: 0.5, window: 32, score: probability}  # per-domain masks, retrieved at inference
calibration: {batches: 8, batch_size: 8, seq_len: 128, min_tokens: 0}
                              # seq_len: at most the model's max positions (default: 128, or the
                              # model's max positions when it has fewer)
evaluation: {batches: 4}

Only the section of the recipe's method may be given (a `prune:` section in a `method: merge`
recipe would be ignored, so it is refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from moekit.compress.scores import SCORES
from moekit.errors import (
    ConfigError,
    MoekitError,
    require_choice,
    require_int,
    require_known_fields,
    require_number,
)

METHODS = ("prune", "merge", "quantize", "premoe")
ALGORITHMS = ("rtn", "gptq")
HESSIANS = ("routed", "affinity")
MERGE_METHODS = ("hc_smoe", "sub_moe")
STORAGES = ("fake", "packed")


def _keep(field_name: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field_name, f"got {value!r}, expected an expert count or a fraction in (0, 1)")
    if isinstance(value, float) and not 0 < value < 1:
        raise ConfigError(field_name, f"got {value}, expected a fraction in (0, 1) or an integer count")
    if isinstance(value, int) and value < 1:
        raise ConfigError(field_name, f"got {value}, expected a positive count")
    return value


ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class PruneRecipe:
    score: str = "reap"
    keep: float | int | tuple[int, ...] = 0.5  # a tuple: one count per MoE layer
    protect_super_experts: bool = False
    allocation: str = "uniform"  # global: the budget keep x layers shared between layers by saliency
    padding: str | None = None  # mask | restore (default: mask where the router can, see padding.py)

    def __post_init__(self) -> None:
        from moekit.compress.padding import PADDING_MODES

        require_choice("prune.score", self.score, SCORES)
        require_choice("prune.allocation", self.allocation, ALLOCATIONS)
        if self.padding is not None:
            require_choice("prune.padding", self.padding, PADDING_MODES)
        if isinstance(self.keep, (list, tuple)):
            if not self.keep:
                raise ConfigError("prune.keep", "got an empty list, expected one count per MoE layer")
            for i, count in enumerate(self.keep):
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    raise ConfigError(f"prune.keep[{i}]", f"got {count!r}, expected a positive expert count")
            if self.allocation == "global":
                raise ConfigError("prune.allocation", "global allocation takes one keep count or fraction")
        else:
            _keep("prune.keep", self.keep)
        if self.allocation == "global" and self.score == "stun":
            raise ConfigError(
                "prune.allocation", "global allocation needs a saliency; stun only ranks within a layer"
            )


@dataclass(frozen=True)
class MergeRecipe:
    keep: float | int = 0.5
    align: bool = True
    method: str = "hc_smoe"
    rank: int | None = None  # sub_moe only: cap on each merged matrix's rank (None: full)

    def __post_init__(self) -> None:
        _keep("merge.keep", self.keep)
        require_choice("merge.method", self.method, MERGE_METHODS)
        if self.rank is not None:
            if self.method != "sub_moe":
                raise ConfigError("merge.rank", "only method sub_moe takes a rank")
            require_int("merge.rank", self.rank, minimum=1)


@dataclass(frozen=True)
class QuantizeRecipe:
    algorithm: str = "gptq"
    hessian: str = "affinity"
    group_size: int = 32
    bits: int | None = 4
    mean_bits: float | None = None
    choices: tuple[int, ...] = (2, 3, 4, 8)
    protect_super_experts: bool = True
    storage: str = "fake"  # fake: float weights (HF folder / checkpoint); packed: moekit's packed form

    def __post_init__(self) -> None:
        require_choice("quantize.algorithm", self.algorithm, ALGORITHMS)
        require_choice("quantize.storage", self.storage, STORAGES)
        require_choice("quantize.hessian", self.hessian, HESSIANS)
        require_int("quantize.group_size", self.group_size, minimum=1)
        if (self.bits is None) == (self.mean_bits is None):
            raise ConfigError("quantize.bits", "give exactly one of bits (uniform) or mean_bits (allocated)")
        if self.bits is not None:
            require_choice("quantize.bits", self.bits, (2, 3, 4, 8))
        if self.mean_bits is not None:
            require_number("quantize.mean_bits", self.mean_bits, minimum=0.0, strict=True)
            for bits in self.choices:
                require_choice("quantize.choices", bits, (2, 3, 4, 8))
            if self.mean_bits < min(self.choices):
                raise ConfigError("quantize.mean_bits", f"got {self.mean_bits}, below the smallest choice")


@dataclass(frozen=True)
class PreMoeRecipe:
    keep: float | int = 0.5  # experts each domain keeps per layer
    window: int = 32  # prompt tokens the retrieval reads
    score: str = "probability"  # what TCESS sums: probability, or logit (the released code)

    def __post_init__(self) -> None:
        from moekit.compress.premoe import SCORES

        _keep("premoe.keep", self.keep)
        require_choice("premoe.score", self.score, SCORES)
        require_int("premoe.window", self.window, minimum=1)


DEFAULT_CALIBRATION_SEQ_LEN = 128


@dataclass(frozen=True)
class CalibrationRecipe:
    batches: int = 8
    batch_size: int = 8
    seq_len: int | None = None  # None: DEFAULT_CALIBRATION_SEQ_LEN, or the model's max positions if fewer
    min_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("batches", "batch_size"):
            require_int(f"calibration.{name}", getattr(self, name), minimum=1)
        if self.seq_len is not None:
            require_int("calibration.seq_len", self.seq_len, minimum=2)
        require_int("calibration.min_tokens", self.min_tokens, minimum=0)

    def resolved_seq_len(self, max_positions: int | None, model: str = "the model") -> int:
        """The calibration rows' length for a model of `max_positions` (None: unknown). A seq_len
        the recipe gives above the model's positions is refused; the default is cut to fit."""
        if self.seq_len is None:
            default = DEFAULT_CALIBRATION_SEQ_LEN
            return default if max_positions is None else min(default, max_positions)
        if max_positions is not None and self.seq_len > max_positions:
            raise ConfigError(
                "calibration.seq_len",
                f"got {self.seq_len}, above the max_seq_len={max_positions} of {model}; "
                f"expected at most {max_positions}",
            )
        return self.seq_len


@dataclass(frozen=True)
class EvaluationRecipe:
    batches: int = 4

    def __post_init__(self) -> None:
        require_int("evaluation.batches", self.batches, minimum=1)


@dataclass(frozen=True)
class Recipe:
    method: str
    prune: PruneRecipe = field(default_factory=PruneRecipe)
    merge: MergeRecipe = field(default_factory=MergeRecipe)
    quantize: QuantizeRecipe = field(default_factory=QuantizeRecipe)
    premoe: PreMoeRecipe = field(default_factory=PreMoeRecipe)
    calibration: CalibrationRecipe = field(default_factory=CalibrationRecipe)
    evaluation: EvaluationRecipe = field(default_factory=EvaluationRecipe)

    def __post_init__(self) -> None:
        require_choice("method", self.method, METHODS)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        data = asdict(self)
        return {k: v for k, v in data.items() if k not in METHODS or k == self.method}


_SECTIONS = {
    "prune": PruneRecipe,
    "merge": MergeRecipe,
    "quantize": QuantizeRecipe,
    "premoe": PreMoeRecipe,
    "calibration": CalibrationRecipe,
    "evaluation": EvaluationRecipe,
}


def _section(name: str, value: Any) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(value, dict):
        raise ConfigError(name, f"expected a mapping, got {type(value).__name__}")
    require_known_fields(name, value, (f.name for f in fields(cls)))
    values = dict(value)
    if "choices" in values:
        if not isinstance(values["choices"], list) or not values["choices"]:
            raise ConfigError(f"{name}.choices", "expected a non-empty list of bit widths")
        values["choices"] = tuple(values["choices"])
    if name == "prune" and isinstance(values.get("keep"), list):
        values["keep"] = tuple(values["keep"])
    if name == "quantize" and "mean_bits" in values and "bits" not in values:
        values["bits"] = None
    return cls(**values)


def recipe_from_dict(data: Any) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError("recipe", f"expected a mapping, got {type(data).__name__}")
    require_known_fields("", data, ("method", *_SECTIONS))
    if "method" not in data:
        raise ConfigError("method", f"missing; expected one of {', '.join(METHODS)}")
    require_choice("method", data["method"], METHODS)
    for other in METHODS:
        if other in data and other != data["method"]:
            raise ConfigError(
                other,
                f"a section of method {other}, but this recipe's method is {data['method']}; "
                "remove it (or set method: " + other + ")",
            )
    sections = {name: _section(name, data[name]) for name in _SECTIONS if name in data}
    return Recipe(method=data["method"], **sections)


def load_recipe(path: str | Path) -> Recipe:
    """The recipe in a YAML file; errors name the file and the field."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MoekitError(f"{path}: recipe file not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise MoekitError(f"{path}: cannot read the recipe as YAML ({str(exc).splitlines()[0]})") from None
    try:
        return recipe_from_dict(data)
    except ConfigError as exc:
        raise MoekitError(f"{path}: {exc}") from None
