"""`moekit experiment NAME`: run one miniature reproduction, then write `results.json` (with its
`verdict`) and `report.html` atomically to `runs/experiments/NAME/` or `--out DIR`.

An experiment is a module with `CLAIM` (the paper's claim, with its numbers), `REQUIRES` (the
optional packages it imports) and `run(settings, log) -> Outcome`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.errors import ConfigError, MoekitError
from moekit.experiments.stats import Estimate, combine_verdicts
from moekit.io import write_json_atomic

EXPERIMENTS = {
    "data-mixture": "moekit.experiments.data_mixture",
    "moe-vs-dense": "moekit.experiments.moe_vs_dense",
    "balance-scope": "moekit.experiments.balance_scope",
    "dynamic-compute": "moekit.experiments.dynamic_compute",
    "token-vs-context": "moekit.experiments.token_vs_context",
    "routing-locality": "moekit.experiments.routing_locality",
    "leave-one-out": "moekit.experiments.leave_one_out",
    "efficiency-leverage": "moekit.experiments.efficiency_leverage",
    "imbalance-curriculum": "moekit.experiments.imbalance_curriculum",
}
RESULTS_FORMAT = "moekit-experiment"


@dataclass(frozen=True)
class Check:
    """One measurable part of a claim, with the rule that judged it."""

    name: str
    estimate: Estimate | None
    rule: str  # e.g. "95% CI lower bound >= 0.979 (the paper's 0.989 less 0.01)"
    verdict: str
    paper: str = ""  # the paper's own figure, as the paper states it

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "estimate": self.estimate.to_dict() if self.estimate else None,
            "rule": self.rule,
            "verdict": self.verdict,
            "paper": self.paper,
        }


@dataclass(frozen=True)
class Outcome:
    claim: str
    checks: Sequence[Check]
    results: dict[str, Any]
    sections: Sequence[Any] = field(default_factory=list)  # analysis.report Sections

    @property
    def verdict(self) -> str:
        return combine_verdicts([c.verdict for c in self.checks])


@dataclass(frozen=True)
class ExperimentSettings:
    out_dir: Path
    quick: bool = False
    seeds: int | None = None  # None: the experiment's own default for the mode
    source: str = "builtin"
    progress: bool = True


def experiment_module(name: str) -> Any:
    if name not in EXPERIMENTS:
        raise ConfigError("experiment", f"got {name!r}, expected one of {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def check_requirements(name: str, module: Any) -> None:
    """Fail before any long work when an optional package is missing."""
    missing = [m for m in getattr(module, "REQUIRES", ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise MoekitError(
            f"experiment {name} needs {', '.join(missing)}: "
            "install them with pip install 'moekit[experiments]'"
        )


def verdict_section(name: str, outcome: Outcome) -> Any:
    from moekit.analysis import Section, Table, Text

    rows = [
        [c.name, str(c.estimate) if c.estimate else "", c.paper, c.rule, c.verdict] for c in outcome.checks
    ]
    return Section(
        f"Verdict: {outcome.verdict}",
        [
            Text(f"Claim: {outcome.claim}"),
            Table(["check", "measured (95% CI)", "paper", "rule", "verdict"], rows),
        ],
    )


def run_experiment(
    name: str, settings: ExperimentSettings, log: Callable[[str], None] = print
) -> dict[str, Any]:
    from moekit.analysis import render_report

    module = experiment_module(name)
    check_requirements(name, module)
    if not settings.quick:  # (--quick's own corpus is fixed by its scale)
        check_source(settings.source, quick=False)
    created = not settings.out_dir.exists()
    try:
        settings.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoekitError(f"--out {settings.out_dir}: cannot create the directory ({exc.strerror})") from None
    started = time.perf_counter()
    try:
        outcome: Outcome = module.run(settings, log)
    except MoekitError:
        if created and settings.out_dir.is_dir() and not any(settings.out_dir.iterdir()):
            settings.out_dir.rmdir()  # a refused run leaves no empty --out behind
        raise
    results = {
        "format": RESULTS_FORMAT,
        "experiment": name,
        "claim": outcome.claim,
        "verdict": outcome.verdict,
        "checks": [c.to_dict() for c in outcome.checks],
        "results": outcome.results,
        "quick": settings.quick,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "command": "moekit experiment " + name + (" --quick" if settings.quick else ""),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": sys.version.split()[0]},
    }
    write_json_atomic(settings.out_dir / "results.json", results)
    render_report(
        [verdict_section(name, outcome), *outcome.sections],
        settings.out_dir / "report.html",
        title=f"moekit experiment {name}" + (" (quick)" if settings.quick else ""),
        subtitle=outcome.claim,
    )
    log(f"{name}: {outcome.verdict}")
    for check in outcome.checks:
        log(f"  {check.name}: {check.estimate or ''} ({check.rule}) -> {check.verdict}")
    log(f"wrote {settings.out_dir / 'results.json'} and {settings.out_dir / 'report.html'}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="which claim to reproduce")
    parser.add_argument("--quick", action="store_true", help="a minutes-long version (fewer seeds and steps)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (runs/experiments/NAME)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the experiment's)")
    parser.add_argument(
        "--source",
        default=None,
        help="corpus of the training experiments: sample, builtin or a corpus folder (default builtin); "
        "--quick always trains on the shipped sample",
    )
    parser.add_argument("--no-progress", action="store_true")


QUICK_SOURCE = "sample"  # every experiment's --quick scale trains on the shipped sample corpus


def check_source(source: str, quick: bool) -> None:
    """`--source` names a corpus (checked without building it); with `--quick`, whose scale fixes
    its own corpus, only that corpus is accepted, so a --source is never silently ignored."""
    if quick:
        if source != QUICK_SOURCE:
            raise ConfigError(
                "--source",
                f"got {source!r}, but --quick always trains on the shipped {QUICK_SOURCE!r} corpus; "
                "drop --quick to train on another corpus",
            )
        return
    from moekit.data.build import check_source as check_corpus

    check_corpus(source, "--source")


def main(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError("--seeds", f"got {args.seeds}, expected an integer >= 1")
    if args.source is not None:
        check_source(args.source, args.quick)
    settings = ExperimentSettings(
        out_dir=args.out or Path("runs/experiments") / args.name,
        quick=args.quick,
        seeds=args.seeds,
        source="builtin" if args.source is None else args.source,
        progress=not args.no_progress,
    )
    run_experiment(args.name, settings)
    return 0
