"""How much the training stream makes the step loss swing: `sequential` (a batch is consecutive rows
of one walk through the shuffled documents) vs `mixed` (each row from its own lane).

    .venv/bin/python benchmarks/training_stream.py --steps 80 --hidden 128 \
        --json runs/bench/training_stream.json

The demo's dense model (or a narrower one, `--hidden`), the same seed, schedule and step count,
once per stream. Per stream: the median and 90th percentile of |loss(t) - loss(t-1)| over
consecutive steps, the range of the step loss over the last half of training, the mean number of
domains per batch, and the mean validation loss at the end (the same validation batches for both).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moekit.runtime import keep_freed_memory, tune_cpu_runtime

tune_cpu_runtime()

import numpy as np  # noqa: E402


def run(stream: str, args: argparse.Namespace, data, out: Path) -> dict:
    from moekit.demo import DEMO_MODEL
    from moekit.train.config import RunConfig
    from moekit.train.metrics import read_metrics
    from moekit.train.trainer import Trainer, evaluate

    config = RunConfig.from_dict(
        {
            "name": f"dense-{stream}",
            "out_dir": str(out / stream),
            "model": {**DEMO_MODEL, "hidden_size": args.hidden, "ff_size": 4 * args.hidden},
            "data": {"source": args.source, "seq_len": 256, "layout": "packed", "stream": stream},
            "train": {
                "steps": args.steps,
                "micro_batch_size": 32,
                "lr": 3e-3,
                "warmup_steps": args.steps // 20,
            },
            "loop": {"seed": 0, "log_every": 1, "eval_every": 0, "eval_batches": 1, "progress": False},
        }
    )
    (out / stream / "metrics.jsonl").unlink(missing_ok=True)  # the metrics log appends
    trainer = Trainer(config, data=data, log=lambda _: None)
    domains_per_batch = []
    probe = data.train_batches(32, 256, seed=0, stream=stream)
    for _ in range(args.steps):
        batch = next(probe)
        domains_per_batch.append(len(batch.domains[batch.token_mask].unique()))
    result = trainer.run()
    losses = np.array(
        [r["train/lm_loss"] for r in read_metrics(trainer.out_dir / "metrics.jsonl") if "train/lm_loss" in r]
    )
    jumps = np.abs(np.diff(losses))
    late = losses[len(losses) // 2 :]
    val = evaluate(trainer.model, data, 256, 32, "validation", args.eval_batches)
    return {
        "median_step_jump": float(np.median(jumps)),
        "p90_step_jump": float(np.percentile(jumps, 90)),
        "late_loss_range": [float(late.min()), float(late.max())],
        "domains_per_batch": float(np.mean(domains_per_batch)),
        "val_mean": val["mean"],
        "tokens_per_s": result.tokens_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--source", default="builtin")
    parser.add_argument("--hidden", type=int, default=256, help="model width (FFN 4x); the demo's is 256")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/training_stream"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    keep_freed_memory()
    from moekit.data.lmdata import prepare_data

    data = prepare_data(args.source, log=print)
    results = {stream: run(stream, args, data, args.out) for stream in ("sequential", "mixed")}
    for stream, r in results.items():
        print(
            f"{stream:>10}: |dloss| median {r['median_step_jump']:.3f}, p90 {r['p90_step_jump']:.3f}; "
            f"late step loss {r['late_loss_range'][0]:.2f}-{r['late_loss_range'][1]:.2f}; "
            f"{r['domains_per_batch']:.1f} domains/batch; validation {r['val_mean']:.4f}; "
            f"{r['tokens_per_s']:,.0f} tokens/s"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
