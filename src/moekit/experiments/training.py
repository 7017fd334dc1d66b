"""What the training experiments share: a small model of a given size, one trained arm, its
validation loss and its routing recorded on validation text of every domain.

An arm is a `RunConfig` mapping; the experiment decides what differs between arms (balancing scope,
router kind, ...) and everything else is built here the same way for every arm, so that the arms of
one experiment differ in exactly the variable under test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from moekit.errors import ConfigError
from moekit.experiments.runner import ExperimentSettings


@dataclass(frozen=True)
class ArmScale:
    """Model and run size of one mode: the same on every machine (never scaled to its speed)."""

    source: str
    hidden: int
    layers: int
    heads: int
    expert_ff: int
    num_experts: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    steps: int
    lr: float
    eval_batches: int  # validation batches per domain, for the loss and for the routing trace
    seeds: int


def moe_model(scale: ArmScale, **moe: Any) -> dict[str, Any]:
    """A top-2-of-E MoE LM (Qwen3-MoE router) of `scale`; keys of `moe` override the MoE section."""
    section: dict[str, Any] = {
        "ff_size": scale.expert_ff,
        "router": {"preset": "qwen3_moe", "num_experts": scale.num_experts, "top_k": 2},
    }
    section.update(moe)
    return {
        "vocab_size": "auto",
        "hidden_size": scale.hidden,
        "num_layers": scale.layers,
        "num_heads": scale.heads,
        "max_seq_len": scale.seq_len,
        "ff_size": 2 * scale.expert_ff,
        "moe": section,
    }


def dense_model(scale: ArmScale) -> dict[str, Any]:
    """The dense LM of `scale` whose FFN (width 2 x expert_ff) matches `moe_model`'s active width."""
    model = moe_model(scale)
    model.pop("moe")
    return model


def global_balance(coefficient: Any = 0.01) -> list[dict[str, Any]]:
    """The MoE arms' objectives: a global-batch load-balancing loss at `coefficient` (a number or
    a schedule mapping) and a small router z-loss."""
    return [
        {"kind": "load_balance", "scope": "global", "coefficient": coefficient},
        {"kind": "z_loss", "scope": "global", "coefficient": 0.001},
    ]


def arm_config(
    name: str,
    seed: int,
    scale: ArmScale,
    settings: ExperimentSettings,
    *,
    model: dict[str, Any],
    objectives: list[dict[str, Any]],
    data: dict[str, Any] | None = None,
    checkpoint_every: int = 0,
) -> dict[str, Any]:
    """The `RunConfig` mapping of one arm and seed."""
    return {
        "name": f"{name}-seed{seed}",
        "out_dir": str(settings.out_dir / "runs" / f"{name}-seed{seed}"),
        "model": model,
        "data": {
            "source": scale.source,
            "seq_len": scale.seq_len,
            "layout": "packed",
            "stream": "mixed",
            **(data or {}),
        },
        "train": {
            "steps": scale.steps,
            "micro_batch_size": scale.micro_batch,
            "grad_accum": scale.grad_accum,
            "lr": scale.lr,
            "warmup_steps": max(1, scale.steps // 20),
        },
        "loop": {
            "seed": seed,
            "log_every": max(1, scale.steps // 24),
            "eval_every": 0,
            "eval_batches": 1,
            "checkpoint_every": checkpoint_every,
            "progress": settings.progress,
        },
        "balance": {"objectives": objectives},
    }


def build_trainer(config: dict[str, Any], data: Any, log: Callable[[str], None]) -> Any:
    """The Trainer of one arm, before its first step. An experiment run again into the same --out
    replaces the arm's previous run (whose metrics it would otherwise read as this run's)."""
    from moekit.train.config import RunConfig
    from moekit.train.run_dir import remove_previous_run
    from moekit.train.trainer import Trainer

    trainer = Trainer(RunConfig.from_dict(config), data=data, log=log)
    remove_previous_run(trainer.out_dir)
    return trainer


def train_arm(config: dict[str, Any], data: Any, log: Callable[[str], None]) -> tuple[Any, Any]:
    """Train one arm to the end: (trainer, its TrainResult)."""
    trainer = build_trainer(config, data, log)
    return trainer, trainer.run()


def validation_loss(model: Any, data: Any, scale: ArmScale) -> dict[str, float]:
    """Per-domain validation loss (nats/token) and their unweighted `mean`."""
    from moekit.train.trainer import evaluate

    return evaluate(model, data, scale.seq_len, scale.micro_batch, "validation", scale.eval_batches)


def validation_batches(
    data: Any, scale: ArmScale, rows: int | None = None, per_domain: int | None = None
) -> list[Any]:
    """Validation batches of every domain (`scale.eval_batches` of `scale.micro_batch` rows each
    unless given), interleaved domain by domain."""
    streams = [
        iter(data.eval_batches(d, "validation", batch_size=rows or scale.micro_batch, seq_len=scale.seq_len))
        for d in data.domains
    ]
    batches = []
    for _ in range(per_domain or scale.eval_batches):
        for stream in streams:
            batch = next(stream, None)
            if batch is not None:
                batches.append(batch)
    return batches


def validation_trace(model: Any, data: Any, scale: ArmScale) -> Any:
    """The model's routing over `validation_batches`, with domain labels."""
    from moekit.analysis import record_routing

    return record_routing(model, validation_batches(data, scale), domain_names=data.domains)


def scale_and_seeds(settings: ExperimentSettings, quick: Any, full: Any, name: str) -> tuple[Any, int]:
    """The run's scale (quick, or full on the user's corpus) and its seed count: at least 2, since
    every verdict rests on an interval over seeds."""
    scale = quick if settings.quick else full
    if settings.source != "builtin" and not settings.quick:
        scale = replace(full, source=settings.source)
    seeds = settings.seeds or scale.seeds
    if seeds < 2:
        raise ConfigError("--seeds", f"got {seeds}, {name} needs at least 2 seeds for an interval")
    return scale, seeds
