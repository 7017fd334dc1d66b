"""`moekit experiment dynamic-compute`: routers that choose how many experts a token gets use
fewer than top-2's two on average, give more to harder text, and lose little (top-p routing with
an entropy loss, Huang et al. 2024 #9; null experts, AdaMoE #34; both unified in UniMoE-Audio's
dynamic-capacity MoE #2).

Three arms share everything but the router: top-2 of E experts (the baseline); top-p over the E
experts with p = 0.4 (the released config's threshold), uncapped (`top_k` = E), trained with the
routing-entropy loss that keeps the router from flattening its probabilities; and E null experts
beside the E real ones with top-4 over all 2E (AdaMoE's m = E, k' = 2k), with the null-aware
load-balancing loss. After training, each arm's routing is recorded on validation text of every
domain: the mean number of real experts per token, by domain and by layer. A domain's difficulty
is the top-2 baseline's validation loss on it; "harder domains draw more experts" is the Spearman
correlation over domains between that loss and the arm's mean experts per token. Every figure is
paired by seed and judged on a Student-t interval over seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from moekit.errors import ConfigError
from moekit.experiments.runner import Check, ExperimentSettings, Outcome
from moekit.experiments.stats import mean_estimate, spearman, verdict_at_least, verdict_at_most
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
    "Dynamic routing (top-p with an entropy loss, #9; null experts, #34; unified in #2) uses fewer "
    "than top-2's two experts per token on average (#9: 1.76 at inference; #34: -14.5% FLOPs), gives "
    "more experts to harder inputs (#9: more on BBH-style reasoning), and keeps the validation loss "
    "within 2% of top-2."
)
ARMS = ("top2", "top_p", "null_experts")
DYNAMIC_ARMS = ("top_p", "null_experts")
TOP_P = 0.4  # #9's released top_p_threshold
ENTROPY_COEFFICIENT = 0.01  # β of #9's dynamic loss; the paper's value is not verified
LBL_COEFFICIENT = 0.01
MAX_MEAN_K = 2.0
LOSS_TOLERANCE = 0.02  # relative

QUICK = ArmScale("sample", 64, 2, 2, 64, 8, 64, 8, 1, 30, 3e-3, 2, 2)
FULL = ArmScale("builtin", 128, 2, 2, 128, 8, 128, 16, 1, 240, 3e-3, 8, 3)


def arm_router(arm: str, num_experts: int) -> dict[str, Any]:
    """The MoE section keys that make `arm`'s router."""
    if arm == "top2":
        return {}
    if arm == "top_p":
        return {
            "router": {"num_experts": num_experts, "top_k": num_experts},
            "router_kind": "top_p",
            "router_options": {"p": TOP_P},
        }
    if arm == "null_experts":
        return {
            "router": {"num_experts": num_experts, "top_k": 4, "renorm": "sum"},
            "router_kind": "null_experts",
            "router_options": {"num_null": num_experts},
        }
    raise ConfigError("arm", f"got {arm!r}, expected one of {', '.join(ARMS)}")


def run_config(arm: str, scale: ArmScale, seed: int, settings: ExperimentSettings) -> dict[str, Any]:
    objectives = [
        {"kind": "load_balance", "scope": "global", "coefficient": LBL_COEFFICIENT},
        {"kind": "z_loss", "scope": "global", "coefficient": 0.001},
    ]
    if arm == "top_p":
        objectives.append({"kind": "entropy", "scope": "global", "coefficient": ENTROPY_COEFFICIENT})
    return arm_config(
        arm,
        seed,
        scale,
        settings,
        model=moe_model(scale, **arm_router(arm, scale.num_experts)),
        objectives=objectives,
    )


def experts_per_token(trace: Any) -> dict[str, Any]:
    """Mean real (compute) experts chosen per token, per layer and per (layer, domain), and over
    all layers per domain; null experts and padding slots do not count."""
    per_layer, by_domain = [], []
    domains = trace.domains
    for layer in trace.layers:
        real = ((layer.experts >= 0) & (layer.experts < layer.num_compute_experts)).sum(dim=1).double()
        per_layer.append(float(real.mean()))
        by_domain.append(
            {trace.domain_name(d): float(real[domains == d].mean()) for d in range(trace.num_domains)}
        )
    names = list(by_domain[0])
    overall = {d: float(np.mean([row[d] for row in by_domain])) for d in names}
    return {
        "mean_k": float(np.mean(per_layer)),
        "mean_k_per_layer": per_layer,
        "mean_k_by_domain_layer": by_domain,
        "mean_k_by_domain": overall,
    }


def run(settings: ExperimentSettings, log: Callable[[str], None] = print) -> Outcome:
    from moekit.data.lmdata import prepare_data

    scale, seeds = scale_and_seeds(settings, QUICK, FULL, "dynamic-compute")
    data = prepare_data(scale.source, log=log)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in range(seeds):
        for arm in ARMS:
            trainer, result = train_arm(run_config(arm, scale, seed, settings), data, log)
            val = validation_loss(trainer.model, data, scale)
            counts = experts_per_token(validation_trace(trainer.model, data, scale))
            runs[arm].append({"seed": seed, "val_loss": val, "tokens_per_s": result.tokens_per_s, **counts})
            log(f"{arm} seed {seed}: validation loss {val['mean']:.4f}, {counts['mean_k']:.3f} experts/token")
    return outcome(runs, scale, seeds)


def difficulty_correlation(baseline: dict[str, Any], arm: dict[str, Any]) -> float:
    """Spearman over domains between the top-2 baseline's validation loss (difficulty) and the arm's
    mean experts per token; 0 when the arm gives every domain the same count (no preference)."""
    domains = sorted(arm["mean_k_by_domain"])
    rho = spearman([baseline["val_loss"][d] for d in domains], [arm["mean_k_by_domain"][d] for d in domains])
    return 0.0 if np.isnan(rho) else rho


def outcome(runs: dict[str, list[dict[str, Any]]], scale: ArmScale, seeds: int) -> Outcome:
    """The checks from the recorded runs (pure: the tests feed it made-up runs)."""
    base = runs["top2"]
    checks, estimates = [], {}
    for arm in DYNAMIC_ARMS:
        mean_k = mean_estimate([r["mean_k"] for r in runs[arm]])
        rho = mean_estimate([difficulty_correlation(b, r) for b, r in zip(base, runs[arm], strict=True)])
        excess = mean_estimate(
            [r["val_loss"]["mean"] / b["val_loss"]["mean"] - 1 for b, r in zip(base, runs[arm], strict=True)]
        )
        estimates[arm] = {
            "mean_k": mean_k.to_dict(),
            "difficulty_rho": rho.to_dict(),
            "loss_excess": excess.to_dict(),
        }
        checks += [
            Check(
                f"{arm}: mean real experts per token on validation text",
                mean_k,
                f"95% CI upper bound <= {MAX_MEAN_K}",
                verdict_at_most(mean_k, MAX_MEAN_K),
                paper="#9: 1.76 at inference" if arm == "top_p" else "#34: below k with m = E, k' = 2k",
            ),
            Check(
                f"{arm}: harder domains draw more experts (Spearman, domains: top-2 loss vs experts/token)",
                rho,
                "95% CI lower bound >= 0",
                verdict_at_least(rho, 0.0),
                paper="#9: more experts for BBH-style reasoning" if arm == "top_p" else "",
            ),
            Check(
                f"{arm}: validation loss relative to top-2 (arm / top-2 - 1), paired by seed",
                excess,
                f"95% CI upper bound <= {LOSS_TOLERANCE}",
                verdict_at_most(excess, LOSS_TOLERANCE),
            ),
        ]
    summary = {
        arm: {
            "val_loss": float(np.mean([r["val_loss"]["mean"] for r in runs[arm]])),
            "mean_k": float(np.mean([r["mean_k"] for r in runs[arm]])),
            "mean_k_per_layer": np.mean([r["mean_k_per_layer"] for r in runs[arm]], axis=0).tolist(),
            "mean_k_by_domain": {
                d: float(np.mean([r["mean_k_by_domain"][d] for r in runs[arm]]))
                for d in runs[arm][0]["mean_k_by_domain"]
            },
            "val_loss_by_domain": {
                d: float(np.mean([r["val_loss"][d] for r in runs[arm]]))
                for d in runs[arm][0]["mean_k_by_domain"]
            },
        }
        for arm in ARMS
    }
    results = {
        "scale": scale.__dict__,
        "seeds": seeds,
        "top_p": TOP_P,
        "entropy_coefficient": ENTROPY_COEFFICIENT,
        "runs": runs,
        "summary": summary,
        "estimates": estimates,
    }
    return Outcome(CLAIM, checks, results, _sections(results))


def _sections(results: dict[str, Any]) -> list[Any]:
    from moekit.analysis import Section, Table, Text

    summary = results["summary"]
    domains = list(summary["top2"]["mean_k_by_domain"])
    layers = len(summary["top2"]["mean_k_per_layer"])
    rows = [
        [
            arm,
            f"{summary[arm]['val_loss']:.4f}",
            f"{summary[arm]['mean_k']:.3f}",
            *[f"{summary[arm]['mean_k_per_layer'][i]:.3f}" for i in range(layers)],
        ]
        for arm in ARMS
    ]
    by_layer = Table(
        ["router", "val loss", "experts/token", *[f"layer {i}" for i in range(layers)]],
        rows,
        caption=f"means over {results['seeds']} seeds; real experts only (null experts cost nothing)",
    )
    by_domain = Table(
        ["domain", "top-2 val loss (difficulty)", *[f"{arm} experts/token" for arm in DYNAMIC_ARMS]],
        [
            [
                d,
                f"{summary['top2']['val_loss_by_domain'][d]:.4f}",
                *[f"{summary[arm]['mean_k_by_domain'][d]:.3f}" for arm in DYNAMIC_ARMS],
            ]
            for d in sorted(domains, key=lambda d: summary["top2"]["val_loss_by_domain"][d])
        ],
        caption="domains from easiest to hardest by the top-2 baseline's validation loss",
    )
    text = Text(
        f"top-p: p = {results['top_p']}, uncapped, routing-entropy loss coefficient "
        f"{results['entropy_coefficient']}; null experts: E real + E null, top-4 over all, null-aware "
        "load-balancing loss; top-2: the baseline. Same data, seeds, optimiser and steps in every arm."
    )
    return [Section("Experts per token: top-2 vs top-p vs null experts", [text, by_layer, by_domain])]
