"""Training steps with moekit's kernels of torch's arithmetic (RoPE, RMSNorm, shared experts'
SwiGLU) against torch's own ops, side by side in one process (BENCHMARKS.md §2).

    .venv/bin/python benchmarks/training_kernels.py --model tiny-moe demo-dense demo-moe --threads 2 1

The kernels give torch's values and gradients bit for bit, so the arms differ only in time. The
torch arm is the same process with the kernels' probes reporting failure, which is what sends
every call to torch's ops (as on a machine where a probe disagrees). Each round runs every arm
once, in an order rotated from round to round; medians after two warm-up rounds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from unittest.mock import patch

from moekit.runtime import keep_freed_memory, tune_cpu_runtime

tune_cpu_runtime()

import torch  # noqa: E402

from moekit.bench.machine import cpu_description, cpu_line  # noqa: E402
from moekit.bench.timing import interleaved_medians  # noqa: E402
from moekit.kernels import rms_norm, rope, torch_swiglu  # noqa: E402

# the kernels' probes; an arm leaves its probes as they are, the others report failure
PROBES = ((rope, "matches_torch"), (rms_norm, "training_matches_torch"), (torch_swiglu, "matches_torch"))
ARMS = {"torch's ops": (), "rotation + RMSNorm": PROBES[:2], "all three": PROBES}


def model_and_batch(name: str) -> tuple[torch.nn.Module, tuple[int, int]]:
    """The model (byte vocabulary) and micro-batch of `name`: tiny-moe, demo-dense or demo-moe."""
    from moekit.demo import DemoSettings, run_configs
    from moekit.models.lm import LanguageModel
    from moekit.train.config import RunConfig

    if name == "tiny-moe":
        config, batch = RunConfig.load(Path("configs/tiny-moe.yaml")), (16, 256)
    else:
        raw = run_configs(DemoSettings(out_dir=Path("runs/unused")))[name.removeprefix("demo-")]
        config, batch = RunConfig.from_dict(raw), (32, 256)
    return LanguageModel(config.model_config(vocab_size=256)), batch


def timed_steps(model: torch.nn.Module, batch: tuple[int, int], kept: tuple) -> Callable[[], float]:
    """Two training steps (forward, backward, AdamW) with only the `kept` kernels on: seconds per step."""
    ids = torch.randint(0, 256, batch, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run() -> float:
        with ExitStack() as stack:
            for probe in PROBES:
                if probe not in kept:
                    stack.enter_context(patch.object(probe[0], probe[1], return_value=False))
            start = time.perf_counter()
            for _ in range(2):
                out = model(ids)
                logits = out.logits if hasattr(out, "logits") else out[0]
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1)
                )
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return (time.perf_counter() - start) / 2

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", nargs="+", choices=["tiny-moe", "demo-dense", "demo-moe"], default=["tiny-moe"]
    )
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    parser.add_argument("--rounds", type=int, default=19)
    args = parser.parse_args()
    keep_freed_memory()
    missing = [f"{module.__name__}.{name}" for module, name in PROBES if not getattr(module, name)()]
    if missing:
        raise SystemExit(f"the kernels do not run here (probe failed or not built: {', '.join(missing)})")
    print(cpu_line(cpu_description()))
    print("| model, micro-batch | threads | " + " | ".join(ARMS) + " | all / torch |")
    print("|---" * (len(ARMS) + 3) + "|")
    for name in args.model:
        for threads in args.threads:
            torch.set_num_threads(threads)
            model, batch = model_and_batch(name)
            steps = {arm: timed_steps(model, batch, kept) for arm, kept in ARMS.items()}
            medians = interleaved_medians(steps, repeats=args.rounds, warmup=2)
            base = medians["torch's ops"]
            cells = [f"{medians[arm] * 1e3:.1f} ms ({medians[arm] / base:.3f})" for arm in ARMS]
            print(
                f"| {name}, {batch[0]} x {batch[1]} | {threads} | "
                + " | ".join(cells)
                + f" | {medians['all three'] / base:.3f} |"
            )


if __name__ == "__main__":
    main()
