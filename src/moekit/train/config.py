"""A training run's configuration: model, data, optimisation, balancing; validated on load."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moekit.balance.config import BalanceConfig
from moekit.config_tree import apply_overrides, dataclass_from_dict, load_yaml
from moekit.data.loader import STREAMS
from moekit.device import DEVICES, DTYPES
from moekit.errors import ConfigError, require_choice, require_int, require_number
from moekit.models.lm import LMConfig
from moekit.train.methods import MethodConfig

TOKENIZERS = ("byte", "bpe")
LAYOUTS = ("packed", "padded")


@dataclass(frozen=True)
class DataConfig:
    """Which corpus (`sample`, `builtin` or a corpus directory), tokenizer and batch layout."""

    source: str = "builtin"
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    seq_len: int = 256
    layout: str = "packed"
    holdout: str | None = None
    single_domain_batches: bool = False
    cache_dir: str | None = None
    stream: str = "mixed"  # mixed: each row from its own lane; sequential: consecutive rows of one walk

    def __post_init__(self) -> None:
        require_choice("data.tokenizer", self.tokenizer, TOKENIZERS)
        require_choice("data.layout", self.layout, LAYOUTS)
        require_choice("data.stream", self.stream, STREAMS)
        require_int("data.seq_len", self.seq_len, minimum=2)
        require_int("data.bpe_vocab_size", self.bpe_vocab_size, minimum=260)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a warm-up + cosine schedule. A step is one optimizer update over
    `grad_accum` micro-batches of `micro_batch_size` rows each. `device` and `dtype` say where and
    in which precision it computes (`moekit.device`): bf16 is autocast over fp32 master weights."""

    steps: int = 200
    micro_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad_norm: float = 1.0
    device: str = "auto"
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        require_choice("train.device", self.device, DEVICES)
        require_choice("train.dtype", self.dtype, DTYPES)
        for name in ("steps", "micro_batch_size", "grad_accum"):
            require_int(f"train.{name}", getattr(self, name), minimum=1)
        require_int("train.warmup_steps", self.warmup_steps, minimum=0)
        require_number("train.lr", self.lr, minimum=0.0, strict=True)
        require_number("train.min_lr_ratio", self.min_lr_ratio, minimum=0.0)
        if self.min_lr_ratio > 1:  # the final learning rate as a fraction of lr: at most lr itself
            raise ConfigError("train.min_lr_ratio", f"got {self.min_lr_ratio}, expected a number in [0, 1]")
        require_number("train.weight_decay", self.weight_decay, minimum=0.0)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require_number(f"train.{name}", value, minimum=0.0)
            if value >= 1:
                raise ConfigError(f"train.{name}", f"got {value}, expected a number in [0, 1)")
        require_number("train.eps", self.eps, minimum=0.0, strict=True)
        require_number("train.clip_grad_norm", self.clip_grad_norm, minimum=0.0)


@dataclass(frozen=True)
class LoopConfig:
    """Logging, evaluation and checkpoint cadence (in optimizer steps; 0 = never, except at the end)."""

    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    eval_split: str = "validation"
    checkpoint_every: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("log_every", "eval_every", "eval_batches", "checkpoint_every"):
            require_int(f"loop.{name}", getattr(self, name), minimum=0)
        require_choice("loop.eval_split", self.eval_split, ("validation", "test"))


@dataclass(frozen=True)
class ParallelConfig:
    """Expert parallelism: `ep` ranks share each MoE layer's experts (E/ep each); the world size
    (torchrun's processes) divided by `ep` is the number of data-parallel replicas. Every rank takes
    `train.grad_accum` micro-batches of the step's global batch of grad_accum x world size."""

    ep: int = 1

    def __post_init__(self) -> None:
        require_int("parallel.ep", self.ep, minimum=1)


@dataclass(frozen=True)
class RunConfig:
    name: str
    out_dir: str
    model: dict[str, Any]
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    methods: MethodConfig = field(default_factory=MethodConfig)

    def model_config(self, vocab_size: int) -> LMConfig:
        """The model section with `vocab_size: auto` (or absent) resolved from the tokenizer; with
        `init_from`, the starting checkpoint's model config under the section's own keys."""
        values = dict(self.model)
        if "init_from" in values:
            from moekit.train.init_from import init_model_config

            values = {**init_model_config(values.pop("init_from")), **values}
        if values.get("vocab_size", "auto") == "auto":
            values["vocab_size"] = vocab_size
        return LMConfig.from_dict(values)

    @property
    def init_from(self) -> str | None:
        """`model.init_from`: a pretrained moekit checkpoint (or run directory) to start from."""
        return self.model.get("init_from")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "out_dir": self.out_dir,
            "model": self.model,
            "data": asdict(self.data),
            "train": asdict(self.train),
            "loop": asdict(self.loop),
            "balance": self.balance.to_dict(),
            "parallel": asdict(self.parallel),
            "methods": {
                **asdict(self.methods),
                "loramoe_knowledge_domains": list(self.methods.loramoe_knowledge_domains),
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise ConfigError("config", f"expected a mapping, got {type(data).__name__}")
        known = ("name", "out_dir", "model", "data", "train", "loop", "balance", "parallel", "methods")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(unknown[0], f"unknown section; expected one of {', '.join(known)}")
        for required in ("model",):
            if required not in data:
                raise ConfigError(required, "missing")
        model = data["model"]
        if not isinstance(model, dict):
            raise ConfigError("model", f"expected a mapping, got {type(model).__name__}")
        name = data.get("name", "run")
        if not isinstance(name, str) or not name:
            raise ConfigError("name", f"got {name!r}, expected a non-empty string")
        out_dir = data.get("out_dir", f"runs/{name}")
        config = cls(
            name=name,
            out_dir=str(out_dir),
            model=dict(model),
            data=dataclass_from_dict(DataConfig, data.get("data"), "data"),
            train=dataclass_from_dict(OptimConfig, data.get("train"), "train"),
            loop=dataclass_from_dict(LoopConfig, data.get("loop"), "loop"),
            balance=BalanceConfig.from_dict(data.get("balance") or {}, "balance"),
            parallel=dataclass_from_dict(ParallelConfig, data.get("parallel"), "parallel"),
            methods=dataclass_from_dict(MethodConfig, data.get("methods"), "methods"),
        )
        init_from = model.get("init_from")
        if init_from is not None and (not isinstance(init_from, str) or not init_from):
            raise ConfigError("model.init_from", f"got {init_from!r}, expected a checkpoint path")
        # validates the model section now; 'auto' is resolved later
        model_config = config.model_config(vocab_size=256)
        ep = config.parallel.ep
        if model_config.moe is not None and model_config.moe.router.num_experts % ep:
            raise ConfigError(
                "parallel.ep",
                f"got {ep}, expected a divisor of model.moe.router.num_experts="
                f"{model_config.moe.router.num_experts}",
            )
        return config

    @classmethod
    def load(cls, path: Path, overrides: list[str] | None = None) -> RunConfig:
        return cls.from_dict(apply_overrides(load_yaml(path), overrides or []))
