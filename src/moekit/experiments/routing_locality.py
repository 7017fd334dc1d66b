"""`moekit experiment routing-locality`: how consistent an MoE's routing is over consecutive tokens,
and what that means for an expert cache (Liang et al. 2025, "Not All Models Suit Expert
Offloading", #52).

Three top-2-of-E arms trained on single-domain micro-batches (as in `balance-scope`): global-batch
load balancing without a shared expert (the reference), the same with one always-on shared expert
of an expert's width, and micro-batch load balancing without a shared expert. On validation text,
per layer: SRP@16 (the best F1 of a segment router that predicts an expert for all 16 tokens of a
segment), SCH (the hit rate of an oracle cache that keeps the experts most used in the next 16
tokens) at m = 2k and m = E, and the hit rates of LRU and Belady caches of 2k experts over the
layer's request stream. Differences are paired by seed, on Student-t intervals over seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from moekit.experiments.runner import Check, ExperimentSettings, Outcome
from moekit.experiments.stats import mean_estimate, verdict_at_least
from moekit.experiments.training import (
    ArmScale,
    arm_config,
    moe_model,
    scale_and_seeds,
    train_arm,
    validation_loss,
    validation_trace,
)

REQUIRES = ("scipy", "matplotlib")
CLAIM = (
    "Local routing consistency (#52): a shared expert lowers it (SRP@16 with a shared expert below "
    "SRP@16 without), global-batch load balancing raises it over micro-batch balancing, and an "
    "oracle cache of 2k experts serves at least 0.8x what a cache of every expert serves "
    "(#52: a cache of about 2x the active experts is enough)."
)
ARMS = ("global", "shared", "micro_batch")
SEGMENT = 16
TOP_K = 2
SCH_RATIO = 0.8

QUICK = ArmScale("sample", 64, 2, 2, 64, 8, 64, 4, 4, 16, 3e-3, 2, 2)
FULL = ArmScale("builtin", 128, 2, 2, 128, 8, 128, 8, 4, 240, 3e-3, 8, 3)


def run_config(arm: str, scale: ArmScale, seed: int, settings: ExperimentSettings) -> dict[str, Any]:
    shared = {"num_shared_experts": 1, "shared_ff_size": scale.expert_ff} if arm == "shared" else {}
    scope = "micro_batch" if arm == "micro_batch" else "global"
    return arm_config(
        arm,
        seed,
        scale,
        settings,
        model=moe_model(scale, **shared),
        objectives=[
            {"kind": "load_balance", "scope": scope, "coefficient": 0.01},
            {"kind": "z_loss", "scope": "global", "coefficient": 0.001},
        ],
        data={"single_domain_batches": True, "stream": "sequential"},
    )


def locality(trace: Any) -> dict[str, list[float]]:
    """Per layer: SRP@SEGMENT, SCH@SEGMENT at m = 2k and m = E, LRU and Belady hit rates at 2k."""
    from moekit.analysis.health import HealthOptions, layer_health

    cache = 2 * TOP_K
    out: dict[str, list[float]] = {"srp": [], "sch_2k": [], "sch_all": [], "lru_2k": [], "belady_2k": []}
    for index in range(trace.num_layers):
        experts = trace.layer(index).num_compute_experts
        sizes = sorted({min(cache, experts), experts})
        options = HealthOptions(segment_lengths=(SEGMENT,), cache_sizes=tuple(sizes))
        health = layer_health(trace, index, options)
        sch = dict(zip(sizes, health["consistency"]["sch"][str(SEGMENT)], strict=True))
        hits = {p: dict(zip(sizes, health["cache"][p], strict=True)) for p in ("lru", "belady")}
        out["srp"].append(float(health["consistency"]["srp"][str(SEGMENT)]))
        out["sch_2k"].append(float(sch[min(cache, experts)]))
        out["sch_all"].append(float(sch[experts]))
        out["lru_2k"].append(float(hits["lru"][min(cache, experts)]))
        out["belady_2k"].append(float(hits["belady"][min(cache, experts)]))
    return out


def run(settings: ExperimentSettings, log: Callable[[str], None] = print) -> Outcome:
    from moekit.data.lmdata import prepare_data

    scale, seeds = scale_and_seeds(settings, QUICK, FULL, "routing-locality")
    data = prepare_data(scale.source, log=log)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in range(seeds):
        for arm in ARMS:
            trainer, _ = train_arm(run_config(arm, scale, seed, settings), data, log)
            val = validation_loss(trainer.model, data, scale)
            measures = locality(validation_trace(trainer.model, data, scale))
            runs[arm].append({"seed": seed, "val_loss": val, **measures})
            log(
                f"{arm} seed {seed}: SRP@{SEGMENT} "
                + ", ".join(f"{v:.3f}" for v in measures["srp"])
                + f"; validation loss {val['mean']:.4f}"
            )
    return outcome(runs, scale, seeds)


def outcome(runs: dict[str, list[dict[str, Any]]], scale: ArmScale, seeds: int) -> Outcome:
    """The checks from the recorded runs (pure: the tests feed it made-up runs)."""

    def paired(better: str, worse: str) -> Any:
        return mean_estimate(
            [np.mean(b["srp"]) - np.mean(w["srp"]) for b, w in zip(runs[better], runs[worse], strict=True)]
        )

    shared_cost = paired("global", "shared")
    scope_gain = paired("global", "micro_batch")
    sch_ratio = mean_estimate(
        [np.mean(r["sch_2k"]) / max(np.mean(r["sch_all"]), 1e-9) for r in runs["global"]]
    )
    checks = [
        Check(
            f"a shared expert lowers consistency: SRP@{SEGMENT} without - with a shared expert",
            shared_cost,
            "95% CI lower bound >= 0",
            verdict_at_least(shared_cost, 0.0),
            paper="no shared experts gives the highest local consistency (#52)",
        ),
        Check(
            f"global-batch balancing raises consistency: SRP@{SEGMENT} global - micro-batch",
            scope_gain,
            "95% CI lower bound >= 0",
            verdict_at_least(scope_gain, 0.0),
            paper="domain-specialised experts contribute more to consistency (#52, #53)",
        ),
        Check(
            f"a cache of 2k experts is enough: SCH@{SEGMENT}(m = 2k) / SCH(m = E), global arm",
            sch_ratio,
            f"95% CI lower bound >= {SCH_RATIO}",
            verdict_at_least(sch_ratio, SCH_RATIO),
            paper="a cache of about 2x the active experts (#52)",
        ),
    ]
    keys = ("srp", "sch_2k", "sch_all", "lru_2k", "belady_2k")
    summary = {
        arm: {
            "val_loss": float(np.mean([r["val_loss"]["mean"] for r in runs[arm]])),
            **{k: np.mean([r[k] for r in runs[arm]], axis=0).tolist() for k in keys},
        }
        for arm in ARMS
    }
    results = {"scale": scale.__dict__, "seeds": seeds, "segment": SEGMENT, "runs": runs, "summary": summary}
    return Outcome(CLAIM, checks, results, _sections(results))


def _sections(results: dict[str, Any]) -> list[Any]:
    from moekit.analysis import Section, Table, Text

    summary = results["summary"]
    rows = [
        [
            arm,
            layer,
            *[f"{summary[arm][k][layer]:.3f}" for k in ("srp", "sch_2k", "sch_all", "lru_2k", "belady_2k")],
        ]
        for arm in ARMS
        for layer in range(len(summary[arm]["srp"]))
    ]
    table = Table(
        ["arm", "layer", f"SRP@{results['segment']}", "SCH m=2k", "SCH m=E", "LRU hit, 2k", "Belady hit, 2k"],
        rows,
        caption=f"means over {results['seeds']} seeds, on validation text of every domain",
    )
    text = Text(
        "global: global-batch load balancing, no shared expert; shared: the same plus one always-on "
        "shared expert; micro_batch: micro-batch load balancing, no shared expert. Single-domain "
        "micro-batches in every arm."
    )
    return [Section("Local routing consistency and expert caches", [text, table])]
