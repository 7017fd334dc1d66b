"""Two versions of moekit's dispatch side by side: alternating processes, medians, load recorded.

Why: on a loaded machine a dispatch that runs its experts on one thread looks level with one that
uses both cores (both get about one core), and on a quiet one it is 1.6-1.8x slower (BENCHMARKS.md
§13). So each version is run in turn, ABBA, in the same conditions, and each process also records
every thread's on-CPU time per step (Linux `/proc/self/task/*/schedstat`): the busiest thread's
share shows whether a step's work was split over the cores even when the wall clock cannot.

    # `moekit bench layer` in alternating processes, its ratios to dense summarised per row:
    python benchmarks/dispatch_pairs.py --base 714d6c6 --pairs 5 -- \
        --tokens 2048 8 --modes fwd_bwd fwd --peers --repeats 5
    # the grouped layer's fwd+bwd with per-thread CPU times (faster; no peers):
    python benchmarks/dispatch_pairs.py --base 714d6c6 --pairs 3 --threads-profile --shapes coarse fine

`--base`/`--head` take a git revision (its `src/` is exported to a temporary folder) or `.` for
this checkout's `src/` (the default head).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in each version's process: the layer of a `moekit bench layer` shape, fwd+bwd (or fwd) at T tokens,
# interleaved with the dense reference; wall medians and per-thread on-CPU milliseconds per step.
PROFILE = r"""
import json, os, statistics, sys, time
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
from moekit.runtime import keep_freed_memory
keep_freed_memory()
import torch
from moekit.bench.layer import SHAPES, build_layer, shape_input
from moekit.bench.peers import DenseEquivalent

def thread_times():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            run, wait, _ = open(f"/proc/self/task/{tid}/schedstat").read().split()
        except OSError:
            continue
        out[tid] = (int(run), int(wait))
    return out

shapes, tokens, rounds, mode = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
report = {}
for name in shapes:
    shape = SHAPES[name]
    layer = build_layer(shape)
    dense = DenseEquivalent(shape.hidden, shape.top_k * shape.ff)
    x, upstream = shape_input(shape, tokens)
    cases = {"moekit": layer, "dense": dense}
    def step(module):
        if mode == "fwd":
            with torch.no_grad():
                module(x)
            return
        for p in module.parameters():
            p.grad = None
        module(x.detach().requires_grad_()).backward(upstream)
    for _ in range(2):
        for m in cases.values():
            step(m)
    walls = {k: [] for k in cases}
    busy = {k: {} for k in cases}
    for _ in range(rounds):
        for k, m in cases.items():
            before = thread_times()
            start = time.perf_counter()
            step(m)
            walls[k].append(time.perf_counter() - start)
            for tid, (run, wait) in thread_times().items():
                acc = busy[k].setdefault(tid, [0, 0])
                acc[0] += run - before.get(tid, (0, 0))[0]
                acc[1] += wait - before.get(tid, (0, 0))[1]
    report[name] = {
        k: dict(
            wall_ms=statistics.median(walls[k]) * 1e3,
            thread_cpu_ms=sorted((v[0] / rounds / 1e6 for v in busy[k].values()), reverse=True)[:4],
            runqueue_wait_ms=sum(v[1] for v in busy[k].values()) / rounds / 1e6,
        )
        for k in cases
    }
print("RESULT " + json.dumps(dict(report=report, load=os.getloadavg(), threads=torch.get_num_threads())))
"""


def export_src(rev: str, into: Path) -> Path:
    """The `src/` folder of `rev` (`.`: this checkout's)."""
    if rev == ".":
        return ROOT / "src"
    target = into / rev.replace("/", "_")
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target / "src"


def run_version(src: Path, argv: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(src))
    done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({src}): {done.stderr[-2000:]}")
    return done.stdout


def bench_layer_pairs(srcs: dict[str, Path], pairs: int, bench_args: list[str], tmp: Path) -> None:
    ratios: dict[tuple, dict[str, list[float]]] = {}
    loads = []
    for i in range(pairs):
        order = list(srcs) if i % 2 == 0 else list(srcs)[::-1]
        for name in order:
            out = tmp / f"{name}_{i}.json"
            run_version(srcs[name], ["-m", "moekit", "bench", "layer", *bench_args, "--json", str(out)])
            report = json.loads(out.read_text())
            loads.append(report["settings"]["load_average"][0])
            for row in report["results"]:
                if row["impl"] == "moekit":
                    key = (row["shape"], row["tokens"], row["mode"])
                    ratios.setdefault(key, {}).setdefault(name, []).append(row["ratio_vs_dense"])
        print(f"pair {i + 1}/{pairs} done, load {loads[-1]:.1f}", flush=True)
    load = f"load average {min(loads):.1f}-{max(loads):.1f}"
    print(f"\nmoekit / dense, median of {pairs} runs each (runs' ratios); {load}")
    print("| shape | T | mode | " + " | ".join(srcs) + " | head / base |")
    print("|---|---|---|" + "---|" * (len(srcs) + 1))
    for key, by in ratios.items():
        cells = [f"{statistics.median(by[n]):.2f}x ({', '.join(f'{r:.2f}' for r in by[n])})" for n in srcs]
        change = statistics.median(by["head"]) / statistics.median(by["base"])
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + f" | {change:.2f} |")


def profile_pairs(
    srcs: dict[str, Path], pairs: int, shapes: list[str], tokens: int, rounds: int, mode: str
) -> None:
    rows: dict[tuple, list[dict]] = {}
    loads = []
    for i in range(pairs):
        order = list(srcs) if i % 2 == 0 else list(srcs)[::-1]
        for name in order:
            argv = ["-c", PROFILE, ",".join(shapes), str(tokens), str(rounds), mode]
            out = run_version(srcs[name], argv)
            result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            loads.append(result["load"][0])
            for shape, cases in result["report"].items():
                rows.setdefault((shape, name), []).append(cases)
        print(f"pair {i + 1}/{pairs} done, load {loads[-1]:.1f}", flush=True)
    load = f"load average {min(loads):.1f}-{max(loads):.1f}"
    print(f"\n{mode} at T={tokens}, {pairs} processes per version; {load}")
    print("wall: median step; busiest / all threads: on-CPU ms per step; over dense's in the same process")
    for (shape, name), runs in rows.items():
        wall = statistics.median(r["moekit"]["wall_ms"] / r["dense"]["wall_ms"] for r in runs)
        cpu = [(r["moekit"]["thread_cpu_ms"], r["dense"]["thread_cpu_ms"]) for r in runs]
        busiest = statistics.median(ours[0] / dense[0] for ours, dense in cpu)
        total = statistics.median(sum(ours) / sum(dense) for ours, dense in cpu)
        threads = runs[len(runs) // 2]["moekit"]["thread_cpu_ms"]
        print(
            f"{shape:>10} {name:<5} wall {wall:.2f}x  busiest thread {busiest:.2f}x  "
            f"all threads {total:.2f}x  "
            f"(moekit's threads, ms: {', '.join(f'{t:.0f}' for t in threads)})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="git revision of the version to compare against")
    parser.add_argument("--head", default=".", help="git revision, or . for this checkout (default)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads-profile", action="store_true", help="per-thread CPU of fwd+bwd instead")
    parser.add_argument("--shapes", nargs="+", default=["coarse", "fine", "very_fine"])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mode", default="fwd_bwd", choices=["fwd_bwd", "fwd"], help="(--threads-profile)")
    args, bench_args = parser.parse_known_args()
    bench_args = [a for a in bench_args if a != "--"]
    with tempfile.TemporaryDirectory(prefix="moekit-pairs-") as tmp:
        srcs = {"base": export_src(args.base, Path(tmp)), "head": export_src(args.head, Path(tmp))}
        if args.threads_profile:
            profile_pairs(srcs, args.pairs, args.shapes, args.tokens, args.rounds, args.mode)
        else:
            bench_layer_pairs(srcs, args.pairs, bench_args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
