"""`moekit experiment moe-vs-dense`: an MoE beats a dense model with the same active parameters
(Switch, GShard, DeepSeekMoE #10, OpenMoE #56), and fine-grained experts plus a shared expert do at
least as well as coarse experts (DeepSeekMoE, #10).

Three arms share everything but the FFN (data stream, seed, optimiser, schedule, step count, learning
rate): a dense FFN of width W; coarse, top-2 of 8 experts of width W/2; fine-grained + shared, top-2
of 16 experts of width W/4 plus one shared expert of width W/2. A token touches an FFN width of W in
every arm. Differences are paired by seed; each verdict rests on a Student-t interval over seeds.
The same runs are also compared at equal training time: each arm's validation loss interpolated
along its wall clock at the time the quickest arm took for the whole run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moekit.experiments.runner import Check, ExperimentSettings, Outcome
from moekit.experiments.stats import Estimate, mean_estimate, verdict_at_least
from moekit.experiments.training import scale_and_seeds

REQUIRES = ("scipy", "matplotlib")
CLAIM = (
    "At equal active parameters and equal tokens, a top-2-of-8 MoE and a fine-grained top-2-of-16 MoE "
    "with a shared expert both reach a lower validation loss than the dense model, and the "
    "fine-grained + shared MoE is no worse than the coarse one (DeepSeekMoE #10, OpenMoE #56)."
)
ARMS = ("dense", "coarse", "fine_shared")


@dataclass(frozen=True)
class Scale:
    """Model and run size of one mode: the same on every machine (never scaled to its speed)."""

    source: str
    hidden: int
    layers: int
    heads: int
    ffn: int  # W, the active FFN width of every arm
    seq_len: int
    batch: int
    steps: int
    lr: float
    eval_batches: int
    seeds: int


QUICK = Scale("sample", 64, 2, 2, 128, 64, 8, 30, 3e-3, 2, 2)


def demo_scale() -> Scale:
    """The full scale is the demo's models and training run, so the demo's dense and MoE are two of
    this experiment's three arms and the two never drift apart."""
    from moekit.demo import DEMO_EXPERTS, DEMO_MODEL, DemoSettings

    e = DEMO_EXPERTS
    demo = DemoSettings(out_dir=Path("."))
    return Scale(
        source=demo.source,
        hidden=DEMO_MODEL["hidden_size"],
        layers=DEMO_MODEL["num_layers"],
        heads=DEMO_MODEL["num_heads"],
        ffn=e["top_k"] * e["ff_size"] + e["shared_ff_size"],
        seq_len=demo.seq_len,
        batch=demo.micro_batch_size,
        steps=demo.steps,
        lr=demo.lr_moe,
        eval_batches=demo.eval_batches,
        seeds=3,
    )


FULL = demo_scale()


def arm_model(arm: str, scale: Scale) -> dict[str, Any]:
    base = {
        "vocab_size": "auto",
        "hidden_size": scale.hidden,
        "num_layers": scale.layers,
        "num_heads": scale.heads,
        "max_seq_len": scale.seq_len,
        "ff_size": scale.ffn,
    }
    if arm == "dense":
        return base
    w = scale.ffn
    if arm == "coarse":
        moe = {"ff_size": w // 2, "router": {"preset": "qwen3_moe", "num_experts": 8, "top_k": 2}}
    else:
        moe = {
            "ff_size": w // 4,
            "router": {"preset": "qwen3_moe", "num_experts": 16, "top_k": 2},
            "num_shared_experts": 1,
            "shared_ff_size": w // 2,
        }
    return {**base, "moe": moe}


def run_config(arm: str, scale: Scale, seed: int, settings: ExperimentSettings) -> dict[str, Any]:
    config = {
        "name": f"{arm}-seed{seed}",
        "out_dir": str(settings.out_dir / "runs" / f"{arm}-seed{seed}"),
        "model": arm_model(arm, scale),
        "data": {"source": scale.source, "seq_len": scale.seq_len, "layout": "packed", "stream": "mixed"},
        "train": {
            "steps": scale.steps,
            "micro_batch_size": scale.batch,
            "lr": scale.lr,
            "warmup_steps": max(1, scale.steps // 20),
        },
        "loop": {
            "seed": seed,
            "log_every": max(1, scale.steps // 48),
            "eval_every": max(1, scale.steps // 6),
            "eval_batches": max(1, scale.eval_batches // 4),
            "progress": settings.progress,
        },
    }
    if arm != "dense":
        config["balance"] = {
            "objectives": [
                {"kind": "load_balance", "scope": "global", "coefficient": 0.01},
                {"kind": "z_loss", "scope": "global", "coefficient": 0.001},
            ]
        }
    return config


def loss_at_time(times: list[float], losses: list[float], when: float) -> float:
    """Validation loss at wall-clock `when`, linear between evaluations (np.interp)."""
    return float(np.interp(when, times, losses))


def run(settings: ExperimentSettings, log: Callable[[str], None] = print) -> Outcome:
    from moekit.data.lmdata import prepare_data
    from moekit.train.config import RunConfig
    from moekit.train.metrics import read_metrics
    from moekit.train.run_dir import remove_previous_run
    from moekit.train.trainer import Trainer, evaluate

    scale, seeds = scale_and_seeds(settings, QUICK, FULL, "moe-vs-dense")
    data = prepare_data(scale.source, log=log)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in range(seeds):
        for arm in ARMS:
            config = RunConfig.from_dict(run_config(arm, scale, seed, settings))
            trainer = Trainer(config, data=data, log=log)
            remove_previous_run(trainer.out_dir)  # run again: the arm's metrics are this run's alone
            result = trainer.run()
            val = evaluate(trainer.model, data, scale.seq_len, scale.batch, "validation", scale.eval_batches)
            records = read_metrics(trainer.out_dir / "metrics.jsonl")
            curve = [(r["tokens"], r["val/mean"]) for r in records if "val/mean" in r]
            seconds_per_token = 1.0 / result.tokens_per_s
            runs[arm].append(
                {
                    "seed": seed,
                    "val_loss": val,
                    "tokens_per_s": result.tokens_per_s,
                    "parameters": result.parameters,
                    "curve_tokens": [0] + [t for t, _ in curve],
                    "curve_loss": [float(np.log(data.tokenizer.vocab_size))] + [v for _, v in curve],
                    "train_s": trainer.tokens_seen * seconds_per_token,
                }
            )
            log(f"{arm} seed {seed}: validation loss {val['mean']:.4f}, {result.tokens_per_s:,.0f} tokens/s")
    return _outcome(runs, scale, seeds)


def _outcome(runs: dict[str, list[dict[str, Any]]], scale: Scale, seeds: int) -> Outcome:
    loss = {arm: np.array([r["val_loss"]["mean"] for r in runs[arm]]) for arm in ARMS}
    at_time = _equal_time_losses(runs)
    gains = {
        "coarse_vs_dense": loss["dense"] - loss["coarse"],
        "fine_shared_vs_dense": loss["dense"] - loss["fine_shared"],
        "fine_shared_vs_coarse": loss["coarse"] - loss["fine_shared"],
    }
    estimates = {name: mean_estimate(values) for name, values in gains.items()}
    checks = [
        Check(
            "coarse MoE beats dense: dense - MoE validation loss (nats/token), paired by seed",
            estimates["coarse_vs_dense"],
            "95% CI lower bound >= 0",
            verdict_at_least(estimates["coarse_vs_dense"], 0.0),
        ),
        Check(
            "fine-grained + shared MoE beats dense: dense - MoE validation loss",
            estimates["fine_shared_vs_dense"],
            "95% CI lower bound >= 0",
            verdict_at_least(estimates["fine_shared_vs_dense"], 0.0),
        ),
        Check(
            "fine-grained + shared no worse than coarse: coarse - fine validation loss",
            estimates["fine_shared_vs_coarse"],
            "95% CI lower bound >= 0",
            verdict_at_least(estimates["fine_shared_vs_coarse"], 0.0),
        ),
    ]
    results = {
        "scale": scale.__dict__,
        "seeds": seeds,
        "runs": runs,
        "mean_val_loss": {arm: float(v.mean()) for arm, v in loss.items()},
        "gains_nats": {name: e.to_dict() for name, e in estimates.items()},
        "equal_time": at_time,
        "throughput_vs_dense": {
            arm: float(
                np.mean([r["tokens_per_s"] for r in runs[arm]])
                / np.mean([r["tokens_per_s"] for r in runs["dense"]])
            )
            for arm in ARMS
        },
    }
    return Outcome(CLAIM, checks, results, _sections(results))


def _equal_time_losses(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each seed's validation loss of every arm at the wall-clock time the fastest-finishing arm
    took for the whole run: what each would have reached with the same training time."""
    per_seed = []
    for i in range(len(runs["dense"])):
        budget = min(runs[arm][i]["train_s"] for arm in ARMS)
        row = {"seed": i, "seconds": budget}
        for arm in ARMS:
            r = runs[arm][i]
            per_token = r["train_s"] / r["curve_tokens"][-1]
            times = [t * per_token for t in r["curve_tokens"]]
            row[arm] = loss_at_time(times, r["curve_loss"], budget)
        per_seed.append(row)
    return {
        "per_seed": per_seed,
        "mean": {arm: float(np.mean([row[arm] for row in per_seed])) for arm in ARMS},
    }


def _sections(results: dict[str, Any]) -> list[Any]:
    from moekit.analysis import Section, Table, Text, figure_block, loss_curves

    runs = results["runs"]
    rows = []
    for arm in ARMS:
        first = runs[arm][0]
        rows.append(
            [
                arm,
                f"{first['parameters']['active'] / 1e6:.3f}M",
                f"{first['parameters']['total'] / 1e6:.3f}M",
                f"{results['mean_val_loss'][arm]:.4f}",
                f"{results['equal_time']['mean'][arm]:.4f}",
                f"{results['throughput_vs_dense'][arm]:.2f}x",
            ]
        )
    table = Table(
        [
            "arm",
            "active params",
            "total params",
            "val loss, equal tokens",
            "val loss, equal time",
            "tokens/s vs dense",
        ],
        rows,
        caption=f"means over {results['seeds']} seeds",
    )
    curves = {
        arm: ([t / 1e6 for t in runs[arm][0]["curve_tokens"]], runs[arm][0]["curve_loss"]) for arm in ARMS
    }
    text = Text(
        "Gains in nats/token (positive: the MoE, or for fine_shared_vs_coarse the fine-grained MoE, has "
        "the lower loss), mean and 95% t-interval over seeds: "
        + "; ".join(f"{k}: {Estimate(**v)}" for k, v in results["gains_nats"].items())
    )
    return [
        Section(
            "Dense vs coarse vs fine-grained + shared",
            [table, text, figure_block(loss_curves(curves, "validation loss, seed 0", xlabel="tokens (M)"))],
        )
    ]
