"""GPU smoke test: train the demo MoE for a few steps on one GPU in bf16, then check that the
checkpoint round-trips (loads on the CPU and on the GPU with the same values) and that the GPU
model's loss on a batch matches the CPU copy's within bf16 tolerance.

    python benchmarks/gpu_smoke.py [--steps 20] [--dtype bf16|fp32] [--out DIR]

Run it wherever a CUDA GPU is present; without one it prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny-moe.yaml")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible to torch; run this on a machine with a GPU", file=sys.stderr)
        return 2

    from moekit.device import autocast
    from moekit.models.lm import LanguageModel
    from moekit.train.checkpoint import load_checkpoint, resolve_checkpoint
    from moekit.train.config import RunConfig
    from moekit.train.methods import lm_forward
    from moekit.train.trainer import Trainer

    out = args.out or Path(tempfile.mkdtemp(prefix="moekit-gpu-smoke-"))
    overrides = [
        f"train.steps={args.steps}",
        "train.device=cuda",
        f"train.dtype={args.dtype}",
        f"out_dir={out}",
        "loop.eval_every=0",
        "loop.eval_batches=2",
        "loop.progress=false",
    ]
    config = RunConfig.load(args.config, overrides)
    trainer = Trainer(config)
    device = trainer.device
    print(f"device {torch.cuda.get_device_name(device)}, dtype {args.dtype}, {args.steps} steps")
    start = time.perf_counter()
    result = trainer.run()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    checks: dict[str, bool] = {}

    directory = resolve_checkpoint(out)
    on_cpu = LanguageModel(trainer.model_config)
    load_checkpoint(directory, on_cpu, restore_rng=False)
    on_gpu = LanguageModel(trainer.model_config).to(device)
    load_checkpoint(directory, on_gpu, restore_rng=False)
    trained = trainer.model.state_dict()
    checks["checkpoint loads on CPU, equal to the trained weights"] = all(
        torch.equal(tensor, trained[name].cpu()) for name, tensor in on_cpu.state_dict().items()
    )
    checks["checkpoint loads on GPU, equal to the trained weights"] = all(
        torch.equal(tensor, trained[name]) for name, tensor in on_gpu.state_dict().items()
    )
    batch = next(trainer.data.eval_batches(trainer.data.domains[0], "validation", batch_size=4, seq_len=64))
    with torch.no_grad():
        cpu_loss = float(lm_forward(on_cpu.eval(), batch).loss_sum) / batch.num_targets
        with autocast(device, trainer.compute_dtype):
            gpu_loss = float(lm_forward(on_gpu.eval(), batch.to(device)).loss_sum) / batch.num_targets
    checks["GPU loss matches the CPU copy's (within 0.05 nats)"] = abs(cpu_loss - gpu_loss) < 0.05
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/lm_loss"] for r in records if "train/lm_loss" in r]
    checks["training loss is finite and fell"] = bool(
        losses and all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    )
    summary = {
        "steps": result.steps,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(result.tokens_per_s),
        "final_train_loss": result.final_train_loss,
        "val_loss": result.val_loss,
        "cpu_loss": cpu_loss,
        "gpu_loss": gpu_loss,
        "checks": checks,
        "out_dir": str(out),
    }
    print(json.dumps(summary, indent=2))
    failed = [name for name, ok in checks.items() if not ok]
    for name in failed:
        print(f"gpu_smoke: FAILED: {name}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
