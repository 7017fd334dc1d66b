"""The recipe of `moekit build`: one YAML file for the whole domain-experts comparison.

    name: domains-small
    out_dir: runs/domains-small
    data: {source: sample, tokenizer: byte, seq_len: 64}
    domains: [code, english, math]
    seed: {model: {hidden_size: 64, num_layers: 2, num_heads: 4, ff_size: 128, max_seq_len: 64}, steps: 100}
    train: {micro_batch_size: 8, lr: 0.003}          # shared by seed, branch and post-mix training
    branch: {steps: 100, parts: ffn}
    variants:
      - {name: btx, router: random}
      - {name: flexolmo, router: flexolmo, bias: -0.5}
    post_train: {steps: 30, parts: all}
    baselines: {hdee: true, merge: [{method: ta}, {method: pcb, ratio: 0.1}]}
    eval: {batches: 4, batch_size: 4}
    claims: {flexolmo_margin: 0.05}
    hf: true
    run_seed: 0          # seeds the seed model's init and every run's data order

Every field is checked when the recipe loads, before anything trains; an error names the field.
`data.seq_len` is at most the seed's `max_seq_len` (refused, never raised silently; without
`data.seq_len`, the default 64 or the seed's `max_seq_len` if fewer); a variant's
`top_k` (and `attention_top_k`) at most its expert count (the domains, plus the public expert for
FlexOlmo); `branch.top_k` and `branch.bias` belong to `branch.parts: flexolmo` only (top_k 1 or 2).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.config_tree import dataclass_from_dict, load_yaml
from moekit.domains.branch import OWNER_EXPERTS, PARTS
from moekit.domains.mix import MixOptions, mix_experts
from moekit.errors import ConfigError, require_choice, require_int, require_known_fields, require_number
from moekit.merging import METHODS as MERGE_METHODS

POST_PARTS = ("all", "ffn", "router")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _prefixed(prefix: str, exc: ConfigError) -> ConfigError:
    """The same error with its field named as it is in the recipe."""
    inner = exc.field.split(".", 1)[1] if exc.field.startswith(("mix.", "router.")) else exc.field
    return exc.renamed(f"{prefix}.{inner}")


@dataclass(frozen=True)
class DataSection:
    source: str = "sample"
    tokenizer: str = "byte"
    seq_len: int = 64

    def __post_init__(self) -> None:
        require_choice("data.tokenizer", self.tokenizer, ("byte", "bpe"))
        require_int("data.seq_len", self.seq_len, minimum=2)


@dataclass(frozen=True)
class SeedSection:
    path: str | None = None
    model: dict[str, Any] | None = None
    steps: int = 100

    def __post_init__(self) -> None:
        if (self.path is None) == (self.model is None):
            raise ConfigError("seed", "give either seed.path (a dense run or HF folder) or seed.model")
        if self.model is not None and not isinstance(self.model, dict):
            raise ConfigError("seed.model", f"expected a mapping, got {type(self.model).__name__}")
        if self.path is not None and not Path(self.path).is_dir():
            raise ConfigError("seed.path", f"{self.path}: no such folder")
        require_int("seed.steps", self.steps, minimum=1)


@dataclass(frozen=True)
class BranchSection:
    """`parts: flexolmo` trains FlexOlmo's 2-expert owner models (router `top_k`, initial bias)."""

    steps: int = 100
    parts: str = "all"
    top_k: int = 2
    bias: float = -0.5

    def __post_init__(self) -> None:
        require_int("branch.steps", self.steps, minimum=1)
        require_choice("branch.parts", self.parts, PARTS)
        require_int("branch.top_k", self.top_k, minimum=1)
        if self.parts == "flexolmo" and self.top_k > OWNER_EXPERTS:
            raise ConfigError(
                "branch.top_k",
                f"got {self.top_k}, expected 1 or 2 (a FlexOlmo owner model has {OWNER_EXPERTS} experts: "
                "the public one and its own)",
            )
        require_number("branch.bias", self.bias)
        if self.bias > 0:
            raise ConfigError("branch.bias", f"got {self.bias}, expected a number <= 0 (FlexOlmo's bias)")


@dataclass(frozen=True)
class PostTrainSection:
    """The post-mix budget; MoEs train with BTX's load-balancing loss of weight `balance`."""

    steps: int = 30
    parts: str = "all"
    balance: float = 0.01

    def __post_init__(self) -> None:
        require_number("post_train.balance", self.balance, minimum=0.0)
        require_int("post_train.steps", self.steps, minimum=0)
        require_choice("post_train.parts", self.parts, POST_PARTS)


@dataclass(frozen=True)
class EvalSection:
    batches: int = 4
    batch_size: int = 4

    def __post_init__(self) -> None:
        require_int("eval.batches", self.batches, minimum=1)
        require_int("eval.batch_size", self.batch_size, minimum=1)


@dataclass(frozen=True)
class ClaimsSection:
    flexolmo_margin: float = 0.05

    def __post_init__(self) -> None:
        require_number("claims.flexolmo_margin", self.flexolmo_margin, minimum=0.0)


@dataclass(frozen=True)
class Variant:
    name: str
    options: MixOptions


@dataclass(frozen=True)
class MergeBaseline:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    name: str = ""


@dataclass(frozen=True)
class BuildRecipe:
    name: str
    out_dir: str
    data: DataSection
    domains: tuple[str, ...]
    seed: SeedSection
    train: dict[str, Any]
    branch: BranchSection
    variants: tuple[Variant, ...]
    post_train: PostTrainSection
    hdee: bool
    merges: tuple[MergeBaseline, ...]
    eval: EvalSection
    claims: ClaimsSection
    hf: bool
    run_seed: int = 0

    @classmethod
    def from_dict(cls, data: Any) -> BuildRecipe:
        if not isinstance(data, dict):
            raise ConfigError("recipe", f"expected a mapping, got {type(data).__name__}")
        known = ("name", "out_dir", "data", "domains", "seed", "train", "branch", "variants", "post_train",
                 "baselines", "eval", "claims", "hf", "run_seed")  # fmt: skip
        require_known_fields("", data, known)
        for required in ("domains", "seed", "variants"):
            if required not in data:
                raise ConfigError(required, "missing")
        name = data.get("name", "build")
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError("name", f"got {name!r}, expected a name of letters, digits, '-', '_' or '.'")
        domains = data["domains"]
        if not isinstance(domains, list) or not domains or not all(isinstance(d, str) for d in domains):
            raise ConfigError("domains", f"got {domains!r}, expected a list of domain names")
        if len(set(domains)) != len(domains):
            raise ConfigError("domains", f"got {domains}, expected distinct domains")
        train = data.get("train") or {}
        if not isinstance(train, dict):
            raise ConfigError("train", f"expected a mapping, got {type(train).__name__}")
        if "steps" in train:
            raise ConfigError("train.steps", "set steps in seed, branch and post_train instead")
        from moekit.train.config import OptimConfig

        dataclass_from_dict(OptimConfig, {**train, "steps": 1}, "train")  # checks every train key now
        hf = data.get("hf", True)
        if not isinstance(hf, bool):
            raise ConfigError("hf", f"got {hf!r}, expected true or false")
        hdee, merges = _baselines(data.get("baselines"))
        run_seed = data.get("run_seed", 0)
        require_int("run_seed", run_seed, minimum=0)
        branch = dataclass_from_dict(BranchSection, data.get("branch"), "branch")
        if branch.parts != "flexolmo" and isinstance(data.get("branch"), dict):
            for key in ("top_k", "bias"):
                if key in data["branch"]:
                    raise ConfigError(
                        f"branch.{key}",
                        f"only branch.parts: flexolmo takes a {key} (got parts: {branch.parts}); remove it",
                    )
        variants = _variants(data["variants"])
        if branch.parts == "flexolmo":
            _check_flexolmo_owners(variants, merges)
        for i, variant in enumerate(variants):  # a k above the expert count is refused, not cut down
            try:
                variant.options.check_experts(
                    *mix_experts(len(domains), variant.options, branch.parts == "flexolmo")
                )
            except ConfigError as exc:
                raise _prefixed(f"variants[{i}]", exc) from None
        data_section = dataclass_from_dict(DataSection, data.get("data"), "data")
        seed = dataclass_from_dict(SeedSection, data["seed"], "seed")
        if seed.model is not None:
            positions = seed.model.get("max_seq_len")
            given = isinstance(data.get("data"), dict) and "seq_len" in data["data"]
            fits = isinstance(positions, int) and not isinstance(positions, bool) and positions >= 2
            if fits and not given and data_section.seq_len > positions:
                # the default length, cut to a seed that has fewer positions (an explicit one is refused)
                data_section = dataclasses.replace(data_section, seq_len=positions)
            if fits and data_section.seq_len > positions:
                raise ConfigError(
                    "data.seq_len",
                    f"got {data_section.seq_len}, above seed.model.max_seq_len={positions}; "
                    "lower data.seq_len or raise seed.model.max_seq_len",
                )
        return cls(
            name=name,
            out_dir=str(data.get("out_dir", f"runs/{name}")),
            data=data_section,
            domains=tuple(domains),
            seed=seed,
            train=dict(train),
            branch=branch,
            variants=variants,
            post_train=dataclass_from_dict(PostTrainSection, data.get("post_train"), "post_train"),
            hdee=hdee,
            merges=merges,
            eval=dataclass_from_dict(EvalSection, data.get("eval"), "eval"),
            claims=dataclass_from_dict(ClaimsSection, data.get("claims"), "claims"),
            hf=hf,
            run_seed=run_seed,
        )

    @classmethod
    def load(cls, path: str | Path) -> BuildRecipe:
        return cls.from_dict(load_yaml(Path(path)))


def _check_flexolmo_owners(variants, merges) -> None:
    """Owner models (branch.parts: flexolmo) merge only as FlexOlmo does and are not dense."""
    for i, v in enumerate(variants):
        if v.options.router != "flexolmo":
            raise ConfigError(
                f"variants[{i}].router", "branch.parts: flexolmo mixes only with router flexolmo"
            )
        if v.options.attention != "average" or v.options.parallel:
            raise ConfigError(f"variants[{i}].attention", "FlexOlmo owners share the public attention")
    if merges:
        raise ConfigError("baselines.merge", "dense merges need dense branches, not branch.parts: flexolmo")


def _variants(value: Any) -> tuple[Variant, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError("variants", "expected a non-empty list of {name, router, ...}")
    out, names = [], set()
    for i, item in enumerate(value):
        where = f"variants[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(where, f"expected a mapping, got {type(item).__name__}")
        item = dict(item)
        if "bias" in item and item.get("router") != "flexolmo":
            raise ConfigError(
                f"{where}.bias",
                f"only router: flexolmo takes a bias (got router: {item.get('router', 'random')})",
            )
        name = item.pop("name", None)
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(
                f"{where}.name", f"got {name!r}, expected a name of letters, digits, '-', '_' or '.'"
            )
        if name in names:
            raise ConfigError(f"{where}.name", f"{name!r} is used twice")
        names.add(name)
        try:
            options = dataclass_from_dict(MixOptions, item, where)
        except ConfigError as exc:
            raise _prefixed(where, exc) if exc.field.startswith("mix.") else exc from None
        out.append(Variant(name, options))
    return tuple(out)


def _baselines(value: Any) -> tuple[bool, tuple[MergeBaseline, ...]]:
    if value is None:
        return True, ()
    if not isinstance(value, dict):
        raise ConfigError("baselines", f"expected a mapping, got {type(value).__name__}")
    require_known_fields("baselines", value, ("hdee", "merge"))
    hdee = value.get("hdee", True)
    if not isinstance(hdee, bool):
        raise ConfigError("baselines.hdee", f"got {hdee!r}, expected true or false")
    merges = value.get("merge") or []
    if not isinstance(merges, list):
        raise ConfigError(
            "baselines.merge", "expected a list of {method: ta|ties|dare_ta|dare_ties|pcb, ...params}"
        )
    out, names = [], set()
    for i, item in enumerate(merges):
        where = f"baselines.merge[{i}]"
        if not isinstance(item, dict) or "method" not in item:
            raise ConfigError(where, "expected a mapping with a method")
        params = dict(item)
        method = params.pop("method")
        require_choice(f"{where}.method", method, MERGE_METHODS)
        name = params.pop("name", f"merge-{method}")
        if not isinstance(name, str) or not NAME.match(name) or name in names:
            raise ConfigError(
                f"{where}.name", f"got {name!r}, expected a new name (two merges of one method need names)"
            )
        names.add(name)
        out.append(MergeBaseline(method, params, name))
    return hdee, tuple(out)


def replace_out_dir(recipe: BuildRecipe, out_dir: str) -> BuildRecipe:
    return dataclasses.replace(recipe, out_dir=out_dir)
