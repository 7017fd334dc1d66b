"""`moekit experiment leave-one-out`: trained on every domain but one, an MoE generalises to the
unseen domain better than a dense model with the same active parameters, and its experts sort the
seen domains without being told them (Point-MoE #1; the text analogue papers.md gives for it).

For each held-out domain and seed, two arms train on the other domains (`data.holdout`), the same
stream, steps and optimiser: a dense FFN of width 2F and a top-2-of-E MoE of experts of width F, so
a token touches the same FFN width in both. Measured: the held-out domain's validation loss, the
mean validation loss of the seen domains, and the MoE's NMI(top-1 expert; domain) on validation
text of every domain. Differences are paired by (held-out domain, seed) and judged on
Student-t intervals over those pairs.
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
    dense_model,
    global_balance,
    moe_model,
    scale_and_seeds,
    train_arm,
    validation_loss,
    validation_trace,
)

REQUIRES = ("scipy", "matplotlib")
CLAIM = (
    "Trained on every domain but one, an MoE reaches a lower loss than a dense model of equal active "
    "parameters on the held-out domain and on the seen ones, and its routing carries the hidden "
    "domain labels (Point-MoE #1: better zero-shot cross-domain generalisation, experts specialising "
    "by data source without domain labels; here NMI(expert; domain) > 0.2 on every domain's validation text)."
)
ARMS = ("dense", "moe")
NMI_BAR = 0.2  # papers.md's small-scale test for #1

QUICK = ArmScale("sample", 32, 1, 2, 32, 8, 64, 4, 1, 16, 3e-3, 1, 2)
FULL = ArmScale("builtin", 64, 2, 2, 64, 8, 128, 8, 1, 200, 3e-3, 4, 3)
QUICK_HOLDOUTS = 2  # the quick mode holds out the first two domains only


def run_config(arm: str, holdout: str, scale: ArmScale, seed: int, settings: ExperimentSettings) -> dict:
    """Both arms: the same stream without `holdout`; only the FFN differs (dense 2F vs top-2 of E x F)."""
    model, objectives = dense_model(scale), []
    if arm == "moe":
        model = moe_model(scale)
        objectives = global_balance()
    return arm_config(
        f"{arm}-without-{holdout}",
        seed,
        scale,
        settings,
        model=model,
        objectives=objectives,
        data={"holdout": holdout},
    )


def run(settings: ExperimentSettings, log: Callable[[str], None] = print) -> Outcome:
    from moekit.analysis import domain_nmi_per_layer
    from moekit.data.lmdata import prepare_data

    scale, seeds = scale_and_seeds(settings, QUICK, FULL, "leave-one-out")
    domains = prepare_data(scale.source, log=log).domains
    holdouts = domains[:QUICK_HOLDOUTS] if settings.quick else domains
    runs: list[dict[str, Any]] = []
    for holdout in holdouts:
        data = prepare_data(scale.source, holdout=holdout, log=log)
        for seed in range(seeds):
            row: dict[str, Any] = {"holdout": holdout, "seed": seed}
            for arm in ARMS:
                trainer, result = train_arm(run_config(arm, holdout, scale, seed, settings), data, log)
                val = validation_loss(trainer.model, data, scale)
                row[arm] = {
                    "val_loss": val,
                    "heldout_loss": val[holdout],
                    "seen_loss": float(np.mean([v for d, v in val.items() if d not in (holdout, "mean")])),
                    "parameters": result.parameters,
                }
                if arm == "moe":
                    trace = validation_trace(trainer.model, data, scale)
                    row[arm]["nmi_all_domains"] = domain_nmi_per_layer(trace)
                log(
                    f"without {holdout}, seed {seed}, {arm}: held-out loss {row[arm]['heldout_loss']:.4f}, "
                    f"seen {row[arm]['seen_loss']:.4f}"
                )
            runs.append(row)
    return outcome(runs, scale, seeds)


def outcome(runs: list[dict[str, Any]], scale: ArmScale, seeds: int) -> Outcome:
    """The checks from the recorded runs (pure: the tests feed it made-up runs)."""
    heldout = mean_estimate([r["dense"]["heldout_loss"] - r["moe"]["heldout_loss"] for r in runs])
    seen = mean_estimate([r["dense"]["seen_loss"] - r["moe"]["seen_loss"] for r in runs])
    nmi = mean_estimate([float(np.mean(r["moe"]["nmi_all_domains"])) for r in runs])
    pairs = f"paired by (held-out domain, seed), {len(runs)} pairs"
    checks = [
        Check(
            f"held-out domain: dense - MoE validation loss (nats/token), {pairs}",
            heldout,
            "95% CI lower bound >= 0",
            verdict_at_least(heldout, 0.0),
            paper="MoE generalises better zero-shot to unseen domains (#1)",
        ),
        Check(
            f"seen domains: dense - MoE mean validation loss, {pairs}",
            seen,
            "95% CI lower bound >= 0",
            verdict_at_least(seen, 0.0),
            paper="dense degrades on mixed domains, the MoE recovers seen-domain performance (#1)",
        ),
        Check(
            "the MoE's routing carries the domain: NMI(top-1 expert; domain), mean over layers",
            nmi,
            f"95% CI lower bound >= {NMI_BAR}",
            verdict_at_least(nmi, NMI_BAR),
            paper="experts specialise by data source without labels (#1)",
        ),
    ]
    per_domain = {
        holdout: {
            arm: float(np.mean([r[arm]["heldout_loss"] for r in runs if r["holdout"] == holdout]))
            for arm in ARMS
        }
        for holdout in dict.fromkeys(r["holdout"] for r in runs)
    }
    results = {
        "scale": scale.__dict__,
        "seeds": seeds,
        "runs": runs,
        "heldout_gain_nats": heldout.to_dict(),
        "seen_gain_nats": seen.to_dict(),
        "moe_domain_nmi": nmi.to_dict(),
        "heldout_loss_per_domain": per_domain,
    }
    return Outcome(CLAIM, checks, results, _sections(results))


def _sections(results: dict[str, Any]) -> list[Any]:
    from moekit.analysis import Section, Table, Text

    rows = []
    for holdout, losses in results["heldout_loss_per_domain"].items():
        seen = {
            arm: np.mean([r[arm]["seen_loss"] for r in results["runs"] if r["holdout"] == holdout])
            for arm in ARMS
        }
        nmi = np.mean(
            [np.mean(r["moe"]["nmi_all_domains"]) for r in results["runs"] if r["holdout"] == holdout]
        )
        rows.append(
            [
                holdout,
                f"{losses['dense']:.4f}",
                f"{losses['moe']:.4f}",
                f"{seen['dense']:.4f}",
                f"{seen['moe']:.4f}",
                f"{nmi:.3f}",
            ]
        )
    table = Table(
        ["held-out domain", "dense, held-out", "MoE, held-out", "dense, seen", "MoE, seen", "MoE NMI"],
        rows,
        caption=f"validation loss (nats/token), means over {results['seeds']} seeds",
    )
    scale = results["scale"]
    text = Text(
        f"Dense FFN width {2 * scale['expert_ff']} against top-2 of {scale['num_experts']} experts of width "
        f"{scale['expert_ff']}; {scale['steps']} steps of {scale['micro_batch'] * scale['grad_accum']} "
        f"rows of {scale['seq_len']} tokens on the seen domains."
    )
    return [Section("Leave one domain out: dense vs MoE", [text, table])]
