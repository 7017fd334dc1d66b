"""`moekit experiment imbalance-curriculum`: with a 10:1 imbalance between two domains, UniMoE-Audio's
staged curriculum (#2) gives a lower minority-domain loss than naive joint training at equal steps.

Three arms train the same MoE (top-1 of 2 experts of the dense FFN's width, one per domain) for the
same number of optimiser steps in all:
- `naive`: joint training on the 10:1 mixture, constant load-balancing weight;
- `rebalanced`: the same on a 1:1 mixture (the data rebalancing alone, without the stages);
- `curriculum`: (1) one dense proto-expert per domain, trained on that domain alone; (2) the two
  fused as the routed experts (`domains.mix.mix_lm`: FFNs kept, other tensors averaged), only the
  routers trained on the 1:1 mixture; (3) everything trained on the 1:1 mixture with the
  load-balancing weight annealed linearly from high to low.
Differences are paired by seed and judged on Student-t intervals over seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from moekit.experiments.runner import Check, ExperimentSettings, Outcome
from moekit.experiments.stats import mean_estimate, verdict_at_least
from moekit.experiments.training import (
    ArmScale,
    arm_config,
    build_trainer,
    dense_model,
    global_balance,
    scale_and_seeds,
    validation_loss,
)

REQUIRES = ("scipy", "matplotlib")
CLAIM = (
    "On a two-domain corpus with a 10:1 imbalance, UniMoE-Audio's curriculum (dense proto-experts per "
    "domain, fused and router-trained on balanced data, then trained on balanced data with an "
    "annealed balancing weight; #2) gives a lower loss on the minority domain than naive joint "
    "training at equal steps; here also against joint training on the rebalanced mixture, to tell "
    "the stages from the rebalancing."
)
ARMS = ("naive", "rebalanced", "curriculum")
MAJORITY, MINORITY = "english", "code"
IMBALANCE = 10.0
LBL = 0.01  # the joint arms' constant load-balancing weight
ANNEAL = (0.1, 0.001)  # stage 3's weight, linear from the first to the second over the stage
# fractions of the step budget: each proto-expert, the router-only stage, the final stage
STAGES = {"proto": 0.25, "router": 0.1, "joint": 0.4}

QUICK = ArmScale("sample", 32, 1, 2, 32, 2, 64, 4, 1, 24, 3e-3, 1, 2)
FULL = ArmScale("builtin", 64, 2, 2, 64, 2, 128, 8, 1, 300, 3e-3, 4, 3)


def stage_steps(total: int) -> dict[str, int]:
    """Steps per stage; the two proto-experts and the two later stages add up to `total`."""
    proto = max(1, round(total * STAGES["proto"]))
    router = max(1, round(total * STAGES["router"]))
    return {"proto": proto, "router": router, "joint": total - 2 * proto - router}


def mixtures() -> dict[str, dict[str, float]]:
    return {
        "imbalanced": {MAJORITY: IMBALANCE / (IMBALANCE + 1), MINORITY: 1 / (IMBALANCE + 1)},
        "balanced": {MAJORITY: 0.5, MINORITY: 0.5},
    }


def moe_section(scale: ArmScale) -> dict[str, Any]:
    """The MoE every arm ends as: `mix_lm`'s fusion of two dense models (top-1 of 2 experts of the
    dense FFN's width), as a model section."""
    from moekit.domains.mix import MixOptions, moe_config
    from moekit.models.lm import LMConfig

    dense = LMConfig.from_dict({**dense_model(scale), "vocab_size": 1})
    config = moe_config(dense, 2, MixOptions(top_k=1)).to_dict()
    config["vocab_size"] = "auto"
    return config


def run(settings: ExperimentSettings, log: Callable[[str], None] = print) -> Outcome:
    from moekit.data.lmdata import prepare_data
    from moekit.experiments.mixture import MixtureData

    scale, seeds = scale_and_seeds(settings, QUICK, FULL, "imbalance-curriculum")
    base = prepare_data(scale.source, log=log)
    data = {name: MixtureData(base, weights) for name, weights in mixtures().items()}
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in range(seeds):
        for arm in ARMS:
            model = curriculum(scale, seed, settings, base, data, log) if arm == "curriculum" else None
            if model is None:
                mixture = "imbalanced" if arm == "naive" else "balanced"
                config = arm_config(
                    arm, seed, scale, settings, model=moe_section(scale), objectives=global_balance(LBL)
                )
                trainer = build_trainer(config, data[mixture], log)
                trainer.run()
                model = trainer.model
            val = validation_loss(model, base, scale)
            runs[arm].append({"seed": seed, "val_loss": val})
            log(f"{arm} seed {seed}: {MINORITY} {val[MINORITY]:.4f}, {MAJORITY} {val[MAJORITY]:.4f}")
    return outcome(runs, scale, seeds)


def curriculum(scale, seed, settings, base, data, log) -> Any:
    """UniMoE-Audio's three stages; returns the trained MoE."""
    from moekit.domains.mix import MixOptions, mix_lm
    from moekit.experiments.mixture import MixtureData

    steps = stage_steps(scale.steps)

    def stage(name, model, data_, objectives, start=None, routers_only=False):
        config = arm_config(
            f"curriculum-{name}",
            seed,
            replace(scale, steps=steps[name.split("-")[0]]),
            settings,
            model=model,
            objectives=objectives,
        )
        trainer = build_trainer(config, data_, log)
        if start is not None:
            trainer.model.load_state_dict(start)
        if routers_only:
            for key, p in trainer.model.named_parameters():
                p.requires_grad_(".ffn.router." in key)
        trainer.run()
        return trainer.model

    protos = [
        stage(f"proto-{domain}", dense_model(scale), MixtureData(base, {domain: 1.0}), [])
        for domain in (MAJORITY, MINORITY)
    ]
    fused, _ = mix_lm(protos, MixOptions(top_k=1, seed=seed), names=[MAJORITY, MINORITY])
    routed = stage(
        "router",
        moe_section(scale),
        data["balanced"],
        global_balance(LBL),
        fused.state_dict(),
        routers_only=True,
    )
    annealed = {"kind": "linear", "start": ANNEAL[0], "end": ANNEAL[1], "steps": steps["joint"]}
    return stage("joint", moe_section(scale), data["balanced"], global_balance(annealed), routed.state_dict())


def outcome(runs: dict[str, list[dict[str, Any]]], scale: ArmScale, seeds: int) -> Outcome:
    """The checks from the recorded runs (pure: the tests feed it made-up runs)."""

    def gain(other: str, domain: str) -> Any:
        return mean_estimate(
            [
                o["val_loss"][domain] - c["val_loss"][domain]
                for o, c in zip(runs[other], runs["curriculum"], strict=True)
            ]
        )

    vs_naive, vs_rebalanced = gain("naive", MINORITY), gain("rebalanced", MINORITY)
    majority_cost = gain("naive", MAJORITY)
    checks = [
        Check(
            f"minority domain ({MINORITY}): naive - curriculum validation loss (nats/token), paired by seed",
            vs_naive,
            "95% CI lower bound >= 0",
            verdict_at_least(vs_naive, 0.0),
            paper="curriculum gives lower minority-domain loss than naive joint training (#2)",
        ),
        Check(
            f"the stages beyond rebalancing: rebalanced - curriculum {MINORITY} validation loss, "
            "paired by seed",
            vs_rebalanced,
            "95% CI lower bound >= 0",
            verdict_at_least(vs_rebalanced, 0.0),
        ),
    ]
    summary = {
        arm: {d: float(np.mean([r["val_loss"][d] for r in runs[arm]])) for d in (MINORITY, MAJORITY, "mean")}
        for arm in ARMS
    }
    results = {
        "scale": scale.__dict__,
        "seeds": seeds,
        "majority": MAJORITY,
        "minority": MINORITY,
        "imbalance": IMBALANCE,
        "stage_steps": stage_steps(scale.steps),
        "runs": runs,
        "summary": summary,
        "minority_gain_vs_naive": vs_naive.to_dict(),
        "minority_gain_vs_rebalanced": vs_rebalanced.to_dict(),
        "majority_gain_vs_naive": majority_cost.to_dict(),
    }
    return Outcome(CLAIM, checks, results, _sections(results))


def _sections(results: dict[str, Any]) -> list[Any]:
    from moekit.analysis import Section, Table, Text

    summary = results["summary"]
    rows = [
        [arm, f"{summary[arm][MINORITY]:.4f}", f"{summary[arm][MAJORITY]:.4f}", f"{summary[arm]['mean']:.4f}"]
        for arm in ARMS
    ]
    table = Table(
        ["arm", f"{MINORITY} (minority)", f"{MAJORITY} (majority)", "mean of all domains"],
        rows,
        caption=f"validation loss (nats/token), means over {results['seeds']} seeds",
    )
    steps = results["stage_steps"]
    text = Text(
        f"{results['scale']['steps']} optimiser steps in every arm; the curriculum's: {steps['proto']} per "
        f"proto-expert, {steps['router']} router-only, {steps['joint']} joint with the balancing weight "
        f"annealed from {ANNEAL[0]} to {ANNEAL[1]}. Majority-domain change against naive (positive: the "
        f"curriculum is lower): {results['majority_gain_vs_naive']['value']:+.4f} nats."
    )
    return [Section(f"A {results['imbalance']:g}:1 imbalance: naive vs curriculum", [text, table])]
