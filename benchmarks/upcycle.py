"""Upcycling vs training the MoE from scratch vs continuing the dense model, on the built-in corpus.

    .venv/bin/python benchmarks/upcycle.py --seeds 0 1 2 --out runs/bench/upcycle.json

Per seed: a dense model is pre-trained for `pretrain` steps; then, from the same checkpoint,
- the dense model trains on (a fresh warm-up + cosine schedule, like every continuation here) for
  `steps` steps and, on a second curve, for 2 x `steps` (the compute of a top-2 copy-upcycled MoE);
- copy (Sparse Upcycling), Drop-Upcycling (r=0.5) and split (the FFN's neurons into fine-grained
  experts) MoEs are built by `moekit.construct` and train for `steps` steps;
- the same MoE architecture as copy trains from scratch for `steps` steps and for
  `pretrain + steps` steps (the whole budget the upcycled model has seen, dense steps included).
Every run uses the project trainer; MoE runs add a global load-balancing loss (0.01). Reported:
mean validation loss over the five domains (nats per byte), FLOPs per token (6 x the parameters a
token touches, embedding lookup excluded, head included), the step-0 receipt of each recipe, and
tokens-to-match: the steps the dense continuation needs to reach each upcycled model's final loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.construct.hf import UpcycleRecipe
from moekit.construct.lm import upcycle_run
from moekit.data.lmdata import LanguageModelData, prepare_data
from moekit.io import read_json, write_json_atomic
from moekit.models.lm import count_parameters
from moekit.train.config import RunConfig
from moekit.train.trainer import Trainer


@dataclass(frozen=True)
class Settings:
    pretrain: int = 400
    steps: int = 200
    micro_batch_size: int = 16
    seq_len: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    ff_size: int = 256
    num_experts: int = 8
    top_k: int = 2
    split_top_k: int = 4  # split experts are ff/8 wide: top-4 touches half the dense FFN
    lr: float = 3e-3
    continue_lr: float | None = None  # peak lr of the continuations (default: lr, a full re-warm-up)
    dense_from: str | None = None  # reuse this dense checkpoint instead of pre-training one
    scratch: bool = True
    eval_every: int = 25
    eval_batches: int = 4  # per domain; the dense 2x curve is evaluated every eval_every steps
    source: str = "builtin"


def run_config(
    s: Settings, name: str, out: Path, steps: int, seed: int, model: dict, moe: bool, eval_every: int = 0
) -> RunConfig:
    lr = s.continue_lr if s.continue_lr is not None and "init_from" in model else s.lr
    return RunConfig.from_dict(
        {
            "name": name,
            "out_dir": str(out / name),
            "model": model,
            "data": {"source": s.source, "tokenizer": "byte", "seq_len": s.seq_len},
            "train": {"steps": steps, "micro_batch_size": s.micro_batch_size, "lr": lr, "warmup_steps": 10},
            "loop": {
                "seed": seed,
                "log_every": 0,
                "eval_every": eval_every,
                "eval_batches": s.eval_batches,
                "progress": False,
            },
            "balance": {"objectives": [{"kind": "load_balance", "scope": "global", "coefficient": 0.01}]}
            if moe
            else {},
        }
    )


def curve(out_dir: Path) -> list[tuple[int, float]]:
    """(step, mean validation loss over domains) from a run's metrics.jsonl."""
    points = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses = [v for k, v in record.items() if k.startswith("val/")]
        if losses:
            points.append((record["step"], statistics.fmean(losses)))
    return points


def flops_per_token(trainer: Trainer) -> float:
    counts = count_parameters(trainer.model)
    cfg = trainer.model_config
    head = cfg.vocab_size * cfg.hidden_size
    return 6.0 * (counts.active - counts.embedding + head)


def train(config: RunConfig, data: LanguageModelData) -> dict[str, Any]:
    start = time.perf_counter()
    trainer = Trainer(config, data=data, log=lambda _: None)
    flops = flops_per_token(trainer)
    trainer.run()
    points = curve(Path(config.out_dir))
    return {
        "curve": points,
        "final": points[-1][1],
        "flops_per_token": flops,
        "seconds": time.perf_counter() - start,
    }


def steps_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
    """The first step (linearly interpolated between evaluations) at which the curve reaches target."""
    for (s0, l0), (s1, l1) in zip(points, points[1:], strict=False):
        if l1 <= target:
            return s1 if l0 <= target else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def one_seed(s: Settings, seed: int, out: Path, data: LanguageModelData) -> dict[str, Any]:
    dense_model = {
        "vocab_size": "auto",
        "hidden_size": s.hidden_size,
        "num_layers": s.num_layers,
        "num_heads": s.num_heads,
        "ff_size": s.ff_size,
        "max_seq_len": s.seq_len,
    }
    results: dict[str, Any] = {}
    root = out / f"seed{seed}"
    if s.dense_from is None:
        results["dense_pretrain"] = train(
            run_config(s, "dense", root, s.pretrain, seed, dense_model, False), data
        )
    dense_ckpt = s.dense_from or str(root / "dense")
    results["dense_continued"] = train(
        run_config(s, "dense_continued", root, s.steps, seed, {"init_from": dense_ckpt}, False), data
    )
    results["dense_continued_2x"] = train(
        run_config(
            s, "dense_continued_2x", root, 2 * s.steps, seed, {"init_from": dense_ckpt}, False, s.eval_every
        ),
        data,
    )
    recipes = {
        "copy": UpcycleRecipe(s.num_experts, s.top_k, method="copy", seed=seed),
        "drop": UpcycleRecipe(s.num_experts, s.top_k, method="drop", drop_ratio=0.5, seed=seed),
        "split": UpcycleRecipe(s.num_experts, s.split_top_k, method="split", seed=seed),
    }
    for name, recipe in recipes.items():
        built = root / f"upcycled_{name}"
        receipt = upcycle_run(dense_ckpt, built, recipe, corpus=s.source)
        run = train(run_config(s, name, root, s.steps, seed, {"init_from": str(built)}, True), data)
        run["receipt"] = {k: v for k, v in receipt["checks"].items()}
        results[name] = run
    moe_model = {
        **dense_model,
        "moe": {
            "ff_size": s.ff_size,
            "router": {"preset": "mixtral", "num_experts": s.num_experts, "top_k": s.top_k},
        },
    }
    if s.scratch:
        results["scratch"] = train(run_config(s, "scratch", root, s.steps, seed, moe_model, True), data)
        results["scratch_full"] = train(
            run_config(s, "scratch_full", root, s.pretrain + s.steps, seed, moe_model, True), data
        )
    dense_2x = results["dense_continued_2x"]["curve"]
    for name in recipes:
        results[name]["dense_steps_to_match"] = steps_to_reach(dense_2x, results[name]["final"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain", type=int, default=Settings.pretrain)
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--source", default=Settings.source)
    parser.add_argument("--micro-batch-size", type=int, default=Settings.micro_batch_size)
    parser.add_argument("--continue-lr", type=float, help="peak lr of the continuations (default: --lr's)")
    parser.add_argument("--dense-from", help="a dense checkpoint to continue from (skips pre-training)")
    parser.add_argument("--no-scratch", action="store_true", help="skip the MoE-from-scratch runs")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/upcycle"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench/upcycle.json"))
    args = parser.parse_args()
    s = Settings(
        pretrain=args.pretrain,
        steps=args.steps,
        source=args.source,
        micro_batch_size=args.micro_batch_size,
        continue_lr=args.continue_lr,
        dense_from=args.dense_from,
        scratch=not args.no_scratch,
    )
    if args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(
            f"{args.work}: exists and is not empty (runs are not overwritten); pass another --work"
        )
    torch.set_num_threads(1)
    data = prepare_data(s.source, tokenizer="byte", log=lambda _: None)
    start = time.perf_counter()
    per_seed = {seed: one_seed(s, seed, args.work, data) for seed in args.seeds}
    report = {"settings": s.__dict__, "seeds": per_seed, "seconds": time.perf_counter() - start}
    write_json_atomic(args.out, report)
    print(table(report))


def table(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    rows = [
        "dense_pretrain",
        "dense_continued",
        "dense_continued_2x",
        "copy",
        "drop",
        "split",
        "scratch",
        "scratch_full",
    ]
    base = statistics.fmean(seeds[k]["dense_continued"]["flops_per_token"] for k in seeds)
    lines = [
        "| run | steps after dense | FLOPs/token vs dense | val loss (mean [min, max] over seeds) | "
        "dense steps to match (of 2x) | step-0 max dlogit (top-k / all on) |",
        "|---|---|---|---|---|---|",
    ]
    for row in [r for r in rows if all(r in seeds[k] for k in seeds)]:
        finals = [seeds[k][row]["final"] for k in seeds]
        ratio = statistics.fmean(seeds[k][row]["flops_per_token"] for k in seeds) / base
        match = [seeds[k][row].get("dense_steps_to_match") for k in seeds]
        match_text = (
            ", ".join("not reached" if m is None else f"{m:.0f}" for m in match)
            if row in ("copy", "drop", "split")
            else ""
        )
        receipt = seeds[next(iter(seeds))][row].get("receipt", {})
        step0 = " / ".join(f"{c['max_abs_logit_diff']:.2g}" for c in receipt.values())
        steps = seeds[next(iter(seeds))][row]["curve"][-1][0]
        steps = f"(pre-training: {steps})" if row == "dense_pretrain" else steps
        spread = f"{statistics.fmean(finals):.3f} [{min(finals):.3f}, {max(finals):.3f}]"
        lines.append(f"| {row} | {steps} | {ratio:.2f} | {spread} | {match_text} | {step0} |")
    return "\n".join(lines)


def report_from_work(work: Path) -> dict[str, Any]:
    """The report rebuilt from a work folder's runs (the seeds whose runs all finished)."""
    from moekit.construct.lm import load_run_model

    seeds: dict[str, Any] = {}
    for seed_dir in sorted(work.glob("seed*")):
        runs = [
            "dense",
            "dense_continued",
            "dense_continued_2x",
            "copy",
            "drop",
            "split",
            "scratch",
            "scratch_full",
        ]
        runs = [r for r in runs if (seed_dir / r / "checkpoints" / "latest").is_file()]
        if "copy" not in runs:
            continue
        results: dict[str, Any] = {}
        for run in runs:
            model, _ = load_run_model(seed_dir / run)
            counts = count_parameters(model)
            points = curve(seed_dir / run)
            head = model.config.vocab_size * model.config.hidden_size
            results["dense_pretrain" if run == "dense" else run] = {
                "curve": points,
                "final": points[-1][1],
                "flops_per_token": 6.0 * (counts.active - counts.embedding + head),
            }
            receipt = seed_dir / f"upcycled_{run}" / "upcycle_receipt.json"
            if receipt.is_file():
                results[run]["receipt"] = read_json(receipt, "receipt")["checks"]
                results[run]["dense_steps_to_match"] = steps_to_reach(
                    curve(seed_dir / "dense_continued_2x"), points[-1][1]
                )
        seeds[seed_dir.name.removeprefix("seed")] = results
    return {"seeds": seeds}


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        print(table(read_json(Path(sys.argv[2]), "benchmark report")))
    elif len(sys.argv) > 1 and sys.argv[1] == "--table-from-work":
        print(table(report_from_work(Path(sys.argv[2]))))
    else:
        main()
