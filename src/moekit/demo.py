"""`moekit demo`: a dense model and an MoE with the same active parameters, trained on the same
tokens of the built-in corpus; a report tests whether the MoE wins and whether its experts specialise by
domain without ever being told the domains (the recurring claim of the seed papers, §4): the
report states the claim and whether this run shows it, at equal tokens and at equal training time.

The two runs share everything but the FFN: the data stream (same seed, same batches), optimiser,
schedule and step count. The MoE replaces each FFN of width `k * ff + shared_ff` by `num_experts`
fine-grained experts of width `ff`, top-k routed, plus one always-on shared expert of width
`shared_ff` (DeepSeekMoE, #10), so a token touches the same number of FFN parameters in both.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.io import write_json_atomic

DEMO_MODEL = {
    "vocab_size": "auto",
    "hidden_size": 256,
    "num_layers": 2,
    "num_heads": 4,
    "max_seq_len": 256,
}
DEMO_EXPERTS = {"num_experts": 16, "top_k": 2, "ff_size": 256, "shared_ff_size": 512}


@dataclass(frozen=True)
class DemoSettings:
    out_dir: Path
    source: str = "builtin"
    steps: int = 480
    micro_batch_size: int = 32
    seq_len: int = 256
    lr: float = 3e-3
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
            "lr": settings.lr,
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
            "balance": balance,
        },
    }


def run_demo(settings: DemoSettings, log=print) -> dict[str, Any]:
    from moekit.data.lmdata import prepare_data
    from moekit.demo_report import analyse_and_report, equal_time_losses
    from moekit.preflight import require_module, require_writable_dir
    from moekit.train.config import RunConfig
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    parser.add_argument("--source", default="builtin", help="corpus: builtin, sample, or a corpus directory")
    parser.add_argument("--steps", type=int, default=DemoSettings.steps, help="optimizer steps per model")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    settings = DemoSettings(
        out_dir=args.out, source=args.source, steps=args.steps, progress=not args.no_progress
    )
    run_demo(settings)
    return 0
