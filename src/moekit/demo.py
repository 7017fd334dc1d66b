"""`moekit demo`: a dense model and an MoE with the same active parameters, trained on the same
tokens of the built-in corpus; a report tests whether the MoE wins and whether its experts specialise by
domain without ever being told the domains (the recurring claim of the seed papers, §4): the
report states the claim and whether this run shows it, at equal tokens and at equal training time.

The two runs share everything but the FFN and the learning rate (each model's own, picked from the
same grid): the data stream (same seed, same batches), optimiser, schedule and step count. The MoE
replaces each FFN of width `k * ff + shared_ff` by `num_experts` fine-grained experts of width
`ff`, top-k routed, plus one always-on shared expert of width `shared_ff` (DeepSeekMoE, #10), so a
token touches the same number of FFN parameters in both.
The models are small (width 128) so that, in the time budget, each sees about nine training tokens
per active parameter: at width 256 and under two tokens per parameter the two stayed within 0.013
nats per byte of each other, too early in training for the MoE's extra capacity to count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moekit.io import write_json_atomic

DEMO_MODEL = {
    "vocab_size": "auto",
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "max_seq_len": 256,
}
DEMO_EXPERTS = {"num_experts": 16, "top_k": 2, "ff_size": 128, "shared_ff_size": 256}


@dataclass(frozen=True)
class DemoSettings:
    out_dir: Path
    source: str = "builtin"
    steps: int = 600
    micro_batch_size: int = 32
    seq_len: int = 256
    lr_dense: float = 3e-3  # each model's own learning rate, chosen on the same grid (BENCHMARKS.md §2)
    lr_moe: float = 3e-3
    eval_batches: int = 16
    seed: int = 0
    progress: bool = True


def run_configs(settings: DemoSettings) -> dict[str, dict[str, Any]]:
    """The dense and MoE run configs (as dicts for `RunConfig.from_dict`)."""
    e = DEMO_EXPERTS
    active_ff = e["top_k"] * e["ff_size"] + e["shared_ff_size"]
    common = {
        "data": {
            "source": settings.source,
            "seq_len": settings.seq_len,
            "layout": "packed",
            "stream": "mixed",  # every batch mixes the domains: no loss swings by batch domain
        },
        "train": {
            "steps": settings.steps,
            "micro_batch_size": settings.micro_batch_size,
            "lr": settings.lr_dense,
            "warmup_steps": max(1, settings.steps // 20),
        },
        "loop": {
            "seed": settings.seed,
            "log_every": 10,
            "eval_every": max(1, settings.steps // 6),
            "eval_batches": max(1, settings.eval_batches // 4),
            "progress": settings.progress,
        },
    }
    dense_model = {**DEMO_MODEL, "ff_size": active_ff}
    moe_model = {
        **DEMO_MODEL,
        "ff_size": active_ff,
        "moe": {
            "ff_size": e["ff_size"],
            "router": {"preset": "qwen3_moe", "num_experts": e["num_experts"], "top_k": e["top_k"]},
            "num_shared_experts": 1,
            "shared_ff_size": e["shared_ff_size"],
        },
    }
    balance = {
        "objectives": [
            {"kind": "load_balance", "scope": "global", "coefficient": 0.01},
            {"kind": "z_loss", "scope": "global", "coefficient": 0.001},
        ]
    }
    return {
        "dense": {
            "name": "dense",
            "out_dir": str(settings.out_dir / "dense"),
            "model": dense_model,
            **common,
        },
        "moe": {
            "name": "moe",
            "out_dir": str(settings.out_dir / "moe"),
            "model": moe_model,
            **common,
            "train": {**common["train"], "lr": settings.lr_moe},
            "balance": balance,
        },
    }


def run_demo(settings: DemoSettings, log=print) -> dict[str, Any]:
    from moekit.data.lmdata import prepare_data
    from moekit.demo_report import analyse_and_report, equal_time_losses
    from moekit.preflight import require_module, require_writable_dir
    from moekit.train.config import RunConfig
    from moekit.train.run_dir import remove_previous_run
    from moekit.train.trainer import Trainer, evaluate

    require_module("matplotlib", "the demo's HTML report")  # before the training, not after it
    require_writable_dir(settings.out_dir, "output directory")
    configs = {name: RunConfig.from_dict(raw) for name, raw in run_configs(settings).items()}
    started = time.perf_counter()
    data = prepare_data(settings.source, log=log)
    log(f"corpus ready in {time.perf_counter() - started:.1f} s: domains {', '.join(data.domains)}")
    results: dict[str, Any] = {}
    trainers = {}
    for name, config in configs.items():
        trainer = Trainer(config, data=data, log=log)
        remove_previous_run(Path(config.out_dir))  # a demo run again replaces its runs whole
        result = trainer.run()
        val = evaluate(
            trainer.model,
            data,
            settings.seq_len,
            settings.micro_batch_size,
            "validation",
            settings.eval_batches,
        )
        results[name] = {
            "val_loss": val,
            "tokens_per_s": result.tokens_per_s,
            "parameters": result.parameters,
            "steps": result.steps,
        }
        trainers[name] = trainer
        log(f"{name}: mean validation loss {val['mean']:.4f}, {result.tokens_per_s:,.0f} tokens/s")
    results["equal_time"] = equal_time_losses(settings.out_dir, results)
    metrics = {
        **results,
        "comparison": {
            "moe_beats_dense": results["moe"]["val_loss"]["mean"] < results["dense"]["val_loss"]["mean"],
            "throughput_ratio": results["moe"]["tokens_per_s"] / results["dense"]["tokens_per_s"],
            "moe_beats_dense_at_equal_time": results["equal_time"]["moe"] < results["equal_time"]["dense"],
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.__dict__.items()},
        "elapsed_s": time.perf_counter() - started,
    }
    # The training's results are on disk before the report, which could still fail.
    write_json_atomic(settings.out_dir / "metrics.json", metrics)
    analysis = analyse_and_report(settings, data, trainers, results, log=log)
    results["moe"]["domain_nmi"] = analysis["domain_nmi"]
    metrics["elapsed_s"] = time.perf_counter() - started
    write_json_atomic(settings.out_dir / "metrics.json", metrics)
    log(f"wrote {settings.out_dir / 'metrics.json'} and {settings.out_dir / 'report.html'}")
    return metrics


SEED_MARGIN = 0.03  # nats per byte: the gain every seed must show (issue #18)


def seed_summary(gains: dict[int, float], margin: float = SEED_MARGIN) -> dict[str, Any]:
    """Whether the MoE's gain (dense - MoE mean validation loss, per seed) is a real effect: at least
    `margin` on every seed, and a mean more than twice the seed-to-seed spread (the sample standard
    deviation of the gains; with one seed there is no spread to compare against)."""
    values = list(gains.values())
    mean = sum(values) / len(values)
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    every_seed = all(g >= margin for g in values)
    above_spread = len(values) > 1 and mean > 2 * spread
    return {
        "gains": {str(seed): g for seed, g in gains.items()},
        "mean_gain": mean,
        "spread": spread,
        "min_gain": min(values),
        "margin": margin,
        "every_seed_at_least_margin": every_seed,
        "mean_above_twice_spread": above_spread,
        "shown": every_seed and above_spread,
    }


def run_seeds(settings: DemoSettings, seeds: list[int], log=print) -> dict[str, Any]:
    """The demo once per seed (seed N in `out_dir/seed-N`), then `seeds.json` with `seed_summary`."""
    gains, runs = {}, {}
    for seed in seeds:
        metrics = run_demo(replace(settings, seed=seed, out_dir=settings.out_dir / f"seed-{seed}"), log=log)
        gains[seed] = metrics["dense"]["val_loss"]["mean"] - metrics["moe"]["val_loss"]["mean"]
        runs[str(seed)] = {
            "dense": metrics["dense"]["val_loss"]["mean"],
            "moe": metrics["moe"]["val_loss"]["mean"],
            "throughput_ratio": metrics["comparison"]["throughput_ratio"],
            "equal_time": metrics["equal_time"],
            "elapsed_s": metrics["elapsed_s"],
        }
        log(f"seed {seed}: dense {runs[str(seed)]['dense']:.4f}, MoE {runs[str(seed)]['moe']:.4f}")
    summary = {**seed_summary(gains), "runs": runs}
    write_json_atomic(settings.out_dir / "seeds.json", summary)
    verdict = "shows" if summary["shown"] else "does not show"
    log(
        f"MoE gain over dense per seed: {', '.join(f'{g:+.4f}' for g in gains.values())}; mean "
        f"{summary['mean_gain']:+.4f}, spread (s.d.) {summary['spread']:.4f}: this run {verdict} a gain "
        f"of at least {SEED_MARGIN} on every seed and more than twice the spread"
    )
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    parser.add_argument("--source", default="builtin", help="corpus: builtin, sample, or a corpus directory")
    parser.add_argument("--steps", type=int, default=DemoSettings.steps, help="optimizer steps per model")
    parser.add_argument("--seed", type=int, default=DemoSettings.seed, help="initialisation and data order")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run the demo once per seed (OUT/seed-N) and check the MoE's gain across them (OUT/seeds.json)",
    )
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from moekit.data.build import check_source
    from moekit.errors import ConfigError, require_int

    require_int("--steps", args.steps, minimum=1)
    require_int("--seed", args.seed, minimum=0)
    check_source(args.source, "--source")
    for seed in args.seeds or ():
        require_int("--seeds", seed, minimum=0)
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        raise ConfigError("--seeds", f"got {' '.join(map(str, args.seeds))}, expected different seeds")
    settings = DemoSettings(
        out_dir=args.out, source=args.source, steps=args.steps, seed=args.seed, progress=not args.no_progress
    )
    if args.seeds:
        run_seeds(settings, args.seeds)
    else:
        run_demo(settings)
    return 0
