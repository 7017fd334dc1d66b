"""The expert dispatch's speed goals (BENCHMARKS.md §13), checked on the CPU at hand in one command.

Why: one `moekit bench layer` run moves by several percent with the machine's memory traffic (the
dense reference more than moekit), so a goal checked on one run can pass or fail by chance. Here
the benchmark runs in separate processes, quiet several times, then with one core kept busy
(`--busy`), then at decode size, and each goal is judged on the median of the runs' ratios:

- quiet, fwd+bwd at T=2048: moekit within QUIET_GOALS of the dense reference (same run);
- busy: moekit faster than every peer and within BUSY_LIMIT of dense;
- decode (T=8, fwd): the time over the active experts' weight reads at the measured bandwidth,
  reported (the limit no implementation beats), without a goal.

    python benchmarks/dispatch_goals.py --runs 5 --busy-runs 1 --decode-runs 3 --json goals.json
    # a quick look at one shape (arguments after -- go to every `moekit bench layer` run):
    python benchmarks/dispatch_goals.py --runs 1 --busy-runs 0 --decode-runs 0 -- --shapes fine

The CPU (model, family/model/stepping, features, caches) and the dispatch each run chose are
recorded in the JSON, so that results from different machines are never compared as one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from moekit.bench.machine import cpu_line
from moekit.io import write_json_atomic

QUIET_GOALS = {"coarse": 1.10, "fine": 1.10, "very_fine": 1.25}
BUSY_LIMIT = 1.30
QUIET_ARGS = ["--tokens", "2048", "--modes", "fwd_bwd"]
DECODE_ARGS = ["--tokens", "8", "--modes", "fwd"]


def run_bench(args: list[str], out: Path) -> dict:
    """One `moekit bench layer` process; its JSON report."""
    command = [sys.executable, "-m", "moekit", "bench", "layer", *args, "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"moekit bench layer failed ({' '.join(args)}): {done.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())


def ratios(reports: list[dict], field: str = "ratio_vs_dense") -> dict[str, dict[str, list[float]]]:
    """{shape: {impl: [the runs' ratio]}} over the reports' rows."""
    out: dict[str, dict[str, list[float]]] = {}
    for report in reports:
        for row in report["results"]:
            if field in row:
                out.setdefault(row["shape"], {}).setdefault(row["impl"], []).append(row[field])
    return out


def verdicts(quiet: list[dict], busy: list[dict], decode: list[dict]) -> dict:
    """Each goal judged on the median of the runs' ratios: {"quiet": {shape: ...}, "busy": ...,
    "decode": ..., "met": whether every judged goal holds}."""
    result: dict = {"quiet": {}, "busy": {}, "decode": {}}
    for shape, by_impl in ratios(quiet).items():
        runs = by_impl.get("moekit", [])
        if not runs or shape not in QUIET_GOALS:
            continue
        median = statistics.median(runs)
        result["quiet"][shape] = dict(
            median=median, runs=runs, goal=QUIET_GOALS[shape], met=median <= QUIET_GOALS[shape]
        )
    for shape, by_impl in ratios(busy).items():
        if "moekit" not in by_impl:
            continue
        medians = {impl: statistics.median(runs) for impl, runs in by_impl.items()}
        ours = medians.pop("moekit")
        peers = {impl: m for impl, m in medians.items() if not impl.startswith("dense")}
        fastest = all(ours < m for m in peers.values())
        result["busy"][shape] = dict(
            median=ours,
            runs=by_impl["moekit"],
            best_peer=min(peers.items(), key=lambda item: item[1]) if peers else None,
            limit=BUSY_LIMIT,
            met=fastest and ours <= BUSY_LIMIT,
        )
    for shape, by_impl in ratios(decode, "ratio_vs_weight_reads").items():
        runs = by_impl.get("moekit", [])
        if runs:
            result["decode"][shape] = dict(median=statistics.median(runs), runs=runs)
    judged = [v["met"] for part in ("quiet", "busy") for v in result[part].values()]
    result["met"] = bool(judged) and all(judged)
    return result


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def format_verdicts(result: dict) -> str:
    lines = []
    if result["quiet"]:
        lines += ["| quiet, fwd+bwd T=2048 | moekit / dense (runs) | goal | met |", "|---|---|---|---|"]
        for shape, v in result["quiet"].items():
            runs = ", ".join(f"{r:.2f}" for r in v["runs"])
            lines.append(f"| {shape} | {v['median']:.2f}x ({runs}) | {v['goal']:.2f}x | {yes_no(v['met'])} |")
    if result["busy"]:
        lines += [
            "",
            "| busy, fwd+bwd T=2048 | moekit / dense (runs) | best peer | met |",
            "|---|---|---|---|",
        ]
        for shape, v in result["busy"].items():
            runs = ", ".join(f"{r:.2f}" for r in v["runs"])
            peer = f"{v['best_peer'][0]} {v['best_peer'][1]:.2f}x" if v["best_peer"] else "none run"
            lines.append(f"| {shape} | {v['median']:.2f}x ({runs}) | {peer} | {yes_no(v['met'])} |")
    if result["decode"]:
        lines += ["", "| decode, fwd T=8 | time / active experts' weight reads (runs) |", "|---|---|"]
        for shape, v in result["decode"].items():
            lines.append(f"| {shape} | {v['median']:.2f}x ({', '.join(f'{r:.2f}' for r in v['runs'])}) |")
    lines += ["", f"every judged goal met: {yes_no(result['met'])}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="quiet processes")
    parser.add_argument("--busy-runs", type=int, default=1, help="processes with one core kept busy")
    parser.add_argument("--decode-runs", type=int, default=3, help="decode-size processes")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case in each process")
    parser.add_argument("--json", type=Path, help="write the runs and the verdicts here")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    for name in ("runs", "busy_runs", "decode_runs", "repeats"):
        if getattr(args, name) < (1 if name == "repeats" else 0):
            parser.error(f"--{name.replace('_', '-')} must be at least {1 if name == 'repeats' else 0}")
    if args.runs + args.busy_runs + args.decode_runs == 0:
        parser.error("nothing to run: --runs, --busy-runs and --decode-runs are all 0")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: folder {args.json.parent} does not exist")
    common = ["--repeats", str(args.repeats), *extra]
    plan = (
        [("quiet", QUIET_ARGS + ["--peers", "hf"])] * args.runs
        + [("busy", QUIET_ARGS + ["--busy"])] * args.busy_runs
        # decode steps are short: more rounds (the last --repeats given wins)
        + [("decode", DECODE_ARGS + ["--peers", "hf", "--repeats", "9"])] * args.decode_runs
    )
    reports: dict[str, list[dict]] = {"quiet": [], "busy": [], "decode": []}
    with tempfile.TemporaryDirectory(prefix="moekit-goals-") as tmp:
        for i, (kind, bench_args) in enumerate(plan):
            report = run_bench(common + bench_args, Path(tmp) / f"{i}.json")
            reports[kind].append(report)
            load = report["settings"]["load_average"][0]
            print(f"{kind} run {len(reports[kind])} done ({i + 1}/{len(plan)}), load {load:.1f}", flush=True)
    result = verdicts(reports["quiet"], reports["busy"], reports["decode"])
    first = next(r for kind in reports.values() for r in kind)
    print(f"\nCPU: {cpu_line(first['cpu'])}")
    print(format_verdicts(result))
    if args.json is not None:
        write_json_atomic(args.json, dict(cpu=first["cpu"], verdicts=result, reports=reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
