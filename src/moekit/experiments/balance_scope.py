"""`moekit experiment balance-scope`: the load-balancing loss computed over the global batch lets
experts specialise by domain, the same loss computed per micro-batch does not (Qiu et al. 2025,
"Demons in the Detail", #53).

Two arms differ only in the scope of the Switch load-balancing loss E·Σ f_i P_i: per micro-batch
(f from each micro-batch, then averaged: the usual implementation) or over the global batch (f from
all of the step's micro-batches). Every micro-batch holds a single domain (`data.single_domain_batches`
with the sequential stream) and a step accumulates several of them, so the global batch mixes
domains while each micro-batch does not: the micro-batch loss then asks every domain to spread over
all experts, the global one only asks the mixture to. After training, each arm's routing is recorded
on validation text of every domain: NMI(top-1 expert; domain) per layer, each domain's top-2 expert
share, and the corpus-level load (CV and max/mean) per layer. Differences are paired by seed and
judged on Student-t intervals over seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from moekit.experiments.runner import Check, ExperimentSettings, Outcome
from moekit.experiments.stats import mean_estimate, verdict_at_least, verdict_at_most
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
    "With single-domain micro-batches, the load-balancing loss over the global batch gives experts "
    "that specialise by domain (Qiu et al. 2025 #53: much higher domain specialisation and lower "
    "perplexity than the micro-batch loss, up to 42.8B parameters); here: NMI(expert; domain) at "
    "least 1.5x the micro-batch arm's, corpus-level load still bounded (max/mean < 1.5), and a "
    "validation loss no worse."
)
ARMS = ("micro_batch", "global")
NMI_RATIO = 1.5
MAX_LOAD_RATIO = 1.5  # max/mean expert load, papers.md's small-scale test for #53
LOSS_TOLERANCE = 0.01  # nats/token: "no worse" allows this much, about 0.5% of the loss
LBL_COEFFICIENT = 0.01
SHARE_OF_TOP = 2  # top-n expert share per domain (n = top-k)

QUICK = ArmScale("sample", 64, 2, 2, 64, 8, 64, 4, 4, 24, 3e-3, 2, 2)
FULL = ArmScale("builtin", 128, 2, 2, 128, 8, 128, 8, 4, 300, 3e-3, 8, 3)


def run_config(arm: str, scale: ArmScale, seed: int, settings: ExperimentSettings) -> dict[str, Any]:
    """Both arms: single-domain micro-batches of the sequential stream, `grad_accum` of them a step;
    only the load-balancing loss's scope differs."""
    return arm_config(
        arm,
        seed,
        scale,
        settings,
        model=moe_model(scale),
        objectives=[
            {"kind": "load_balance", "scope": arm, "coefficient": LBL_COEFFICIENT},
            {"kind": "z_loss", "scope": "global", "coefficient": 0.001},
        ],
        data={"single_domain_batches": True, "stream": "sequential"},
    )


def routing_measures(trace: Any) -> dict[str, Any]:
    """Per layer: domain NMI, each domain's top-n expert share, load CV and max/mean load."""
    from moekit.analysis import domain_nmi_per_layer, expert_domain_counts
    from moekit.analysis import metrics as m

    nmi = domain_nmi_per_layer(trace)
    shares, cv, max_ratio = [], [], []
    for index in range(trace.num_layers):
        share = m.top_expert_share(expert_domain_counts(trace, index), SHARE_OF_TOP)
        shares.append({trace.domain_name(d): float(share[d]) for d in range(len(share))})
        load = trace.layer(index).load()
        cv.append(m.coefficient_of_variation(load))
        max_ratio.append(1.0 + m.max_violation(load))
    return {"nmi": nmi, "top_share": shares, "load_cv": cv, "max_load_ratio": max_ratio}


def run(settings: ExperimentSettings, log: Callable[[str], None] = print) -> Outcome:
    from moekit.data.lmdata import prepare_data

    scale, seeds = scale_and_seeds(settings, QUICK, FULL, "balance-scope")
    data = prepare_data(scale.source, log=log)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in range(seeds):
        for arm in ARMS:
            trainer, result = train_arm(run_config(arm, scale, seed, settings), data, log)
            val = validation_loss(trainer.model, data, scale)
            measures = routing_measures(validation_trace(trainer.model, data, scale))
            runs[arm].append({"seed": seed, "val_loss": val, "tokens_per_s": result.tokens_per_s, **measures})
            log(
                f"{arm} seed {seed}: validation loss {val['mean']:.4f}, domain NMI per layer "
                + ", ".join(f"{v:.3f}" for v in measures["nmi"])
            )
    return outcome(runs, scale, seeds)


def _mean_nmi(run: dict[str, Any]) -> float:
    return float(np.mean(run["nmi"]))


def outcome(runs: dict[str, list[dict[str, Any]]], scale: ArmScale, seeds: int) -> Outcome:
    """The checks from the recorded runs (pure: the tests feed it made-up runs)."""
    micro, glob = runs["micro_batch"], runs["global"]
    # per seed: the global arm's mean-over-layers NMI over the micro arm's (floored: no division by 0)
    ratios = [_mean_nmi(g) / max(_mean_nmi(mi), 1e-6) for g, mi in zip(glob, micro, strict=True)]
    worst_load = [max(r["max_load_ratio"]) for r in glob]
    loss_gain = [mi["val_loss"]["mean"] - g["val_loss"]["mean"] for g, mi in zip(glob, micro, strict=True)]
    nmi_ratio, load, gain = mean_estimate(ratios), mean_estimate(worst_load), mean_estimate(loss_gain)
    checks = [
        Check(
            "domain specialisation: global NMI / micro-batch NMI (mean over layers), paired by seed",
            nmi_ratio,
            f"95% CI lower bound >= {NMI_RATIO}",
            verdict_at_least(nmi_ratio, NMI_RATIO),
            paper="much stronger domain specialisation with global-batch LBL (#53)",
        ),
        Check(
            "load stays bounded: global arm's worst layer max/mean expert load on validation text",
            load,
            f"95% CI upper bound <= {MAX_LOAD_RATIO}",
            verdict_at_most(load, MAX_LOAD_RATIO),
        ),
        Check(
            "loss no worse: micro-batch - global validation loss (nats/token), paired by seed",
            gain,
            f"95% CI lower bound >= -{LOSS_TOLERANCE}",
            verdict_at_least(gain, -LOSS_TOLERANCE),
            paper="lower perplexity with global-batch LBL (#53)",
        ),
    ]
    summary = {arm: _summary(runs[arm]) for arm in ARMS}
    results = {
        "scale": scale.__dict__,
        "seeds": seeds,
        "lbl_coefficient": LBL_COEFFICIENT,
        "runs": runs,
        "summary": summary,
        "nmi_ratio": nmi_ratio.to_dict(),
        "worst_max_load_ratio_global": load.to_dict(),
        "loss_gain_global_nats": gain.to_dict(),
    }
    return Outcome(CLAIM, checks, results, _sections(results))


def _summary(arm_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds, per layer."""
    layers = range(len(arm_runs[0]["nmi"]))

    def per_layer(key: str) -> list[float]:
        return [float(np.mean([r[key][i] for r in arm_runs])) for i in layers]

    return {
        "val_loss": float(np.mean([r["val_loss"]["mean"] for r in arm_runs])),
        "nmi_per_layer": per_layer("nmi"),
        "load_cv_per_layer": per_layer("load_cv"),
        "max_load_ratio_per_layer": per_layer("max_load_ratio"),
        "top_share_per_layer": [
            {d: float(np.mean([r["top_share"][i][d] for r in arm_runs])) for d in arm_runs[0]["top_share"][i]}
            for i in layers
        ],
    }


def _sections(results: dict[str, Any]) -> list[Any]:
    from moekit.analysis import Section, Table, Text

    summary = results["summary"]
    rows = []
    for arm in ARMS:
        s = summary[arm]
        for layer, nmi in enumerate(s["nmi_per_layer"]):
            shares = s["top_share_per_layer"][layer]
            rows.append(
                [
                    arm,
                    layer,
                    f"{nmi:.3f}",
                    ", ".join(f"{d} {v:.2f}" for d, v in shares.items()),
                    f"{s['load_cv_per_layer'][layer]:.3f}",
                    f"{s['max_load_ratio_per_layer'][layer]:.2f}",
                    f"{s['val_loss']:.4f}",
                ]
            )
    table = Table(
        [
            "LBL scope",
            "layer",
            "NMI(expert; domain)",
            f"top-{SHARE_OF_TOP} expert share per domain",
            "load CV",
            "max/mean load",
            "val loss",
        ],
        rows,
        caption=f"means over {results['seeds']} seeds; routing recorded on validation text of every domain",
    )
    text = Text(
        f"Every micro-batch holds one domain and a step accumulates {results['scale']['grad_accum']} of "
        f"them; the load-balancing coefficient is {results['lbl_coefficient']} in both arms. A top-"
        f"{SHARE_OF_TOP} share of {SHARE_OF_TOP}/E means the domain spreads evenly over the experts, "
        "1.0 that it always uses the same two."
    )
    return [Section("Micro-batch vs global-batch load balancing", [text, table])]
