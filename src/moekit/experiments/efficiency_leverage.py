"""`moekit experiment efficiency-leverage`: the compute a dense model needs to match an MoE, over
the MoE's compute, grows as the MoE's activation ratio falls (Tian et al. 2025, "Towards Greater
Leverage", #22).

Dense runs of one size (FFN width W) train for several multiples of the MoE's token budget; a power
law L(C) = a·C^-b is fitted to their validation losses against training compute C = 6·N_active·D.
Each MoE (active FFN width W in every one) trains once at the base budget; its efficiency leverage
is EL = C_dense(L_MoE) / C_MoE, with C_dense read off the inverted fit. The MoEs vary the activation
ratio A = k/E at granularity 1 (top-2 of 4, 8, 16 experts of width W/2) and the granularity
G = (W/2)/expert width at A = 1/4 (top-2 of 8 x W/2, top-4 of 16 x W/4, top-8 of 32 x W/8).
Trends are fitted per seed (the slope of log EL on log A, and on log G) and judged on Student-t
intervals over seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from moekit.errors import MoekitError
from moekit.experiments.runner import Check, ExperimentSettings, Outcome
from moekit.experiments.stats import INCONCLUSIVE, Estimate, mean_estimate, verdict_at_least, verdict_at_most
from moekit.experiments.training import (
    ArmScale,
    arm_config,
    dense_model,
    global_balance,
    moe_model,
    scale_and_seeds,
    train_arm,
    validation_loss,
)

REQUIRES = ("scipy", "matplotlib")
CLAIM = (
    "Efficiency leverage EL = C_dense / C_MoE at equal loss follows a power law in the activation "
    "ratio A, growing as A falls, and rises with expert granularity up to an optimum of about 8-12 "
    "(Tian et al. 2025 #22, 300+ models up to 28B parameters; Ling-mini-beta matches a 6.1B dense "
    "model with over 7x less compute); here: the slope of log EL on log A is negative, the sparsest "
    "MoE has EL > 1, and EL rises from granularity 1 to 4."
)
DENSE_BUDGETS = (0.5, 1.0, 2.0, 4.0)  # multiples of the MoE's token budget
# name -> (experts, top-k, expert width as a fraction of W): activation ratio k/E, granularity (1/2)/fraction
MOES = {
    "A1/2": (4, 2, 1 / 2),
    "A1/4": (8, 2, 1 / 2),
    "A1/8": (16, 2, 1 / 2),
    "A1/4-G2": (16, 4, 1 / 4),
    "A1/4-G4": (32, 8, 1 / 8),
}
RATIO_ARMS = ("A1/2", "A1/4", "A1/8")
GRANULARITY_ARMS = ("A1/4", "A1/4-G2", "A1/4-G4")

# expert_ff is W/2 here (the coarse experts' width); the dense FFN is 2 * expert_ff = W
QUICK = ArmScale("sample", 32, 1, 2, 32, 8, 32, 4, 1, 8, 3e-3, 1, 2)
FULL = ArmScale("builtin", 64, 2, 2, 64, 8, 128, 8, 1, 150, 3e-3, 4, 3)


def activation_ratio(name: str) -> float:
    experts, top_k, _ = MOES[name]
    return top_k / experts


def granularity(name: str) -> float:
    return (1 / 2) / MOES[name][2]


def power_law_fit(compute: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """(a, b, R^2) of L = a·C^-b, least squares on log L against log C."""
    x, y = np.log(np.asarray(compute, dtype=np.float64)), np.log(np.asarray(loss, dtype=np.float64))
    if len(x) < 2 or np.ptp(x) == 0:
        raise MoekitError("power law: need losses at two or more distinct compute levels")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - float((residual**2).sum() / total) if total > 0 else 1.0
    return float(np.exp(intercept)), float(-slope), r2


def compute_for_loss(a: float, b: float, loss: float) -> float:
    """The compute at which the fitted L = a·C^-b reaches `loss` (the law inverted)."""
    if b <= 0:
        raise MoekitError(f"power law: the dense loss does not fall with compute (exponent {b:.4f})")
    return float((loss / a) ** (-1.0 / b))


def log_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def run_config(arm: str, scale: ArmScale, seed: int, settings: ExperimentSettings) -> dict[str, Any]:
    """A dense run ('dense-x<budget>') or one MoE of `MOES`, with the MoE's active FFN width."""
    if arm.startswith("dense-x"):
        budget = float(arm.removeprefix("dense-x"))
        return arm_config(
            arm,
            seed,
            replace(scale, steps=round(scale.steps * budget)),
            settings,
            model=dense_model(scale),
            objectives=[],
        )
    experts, top_k, width = MOES[arm]
    model = moe_model(
        scale,
        ff_size=round(2 * scale.expert_ff * width),
        router={"preset": "qwen3_moe", "num_experts": experts, "top_k": top_k},
    )
    return arm_config(arm.replace("/", "_"), seed, scale, settings, model=model, objectives=global_balance())


def run(settings: ExperimentSettings, log: Callable[[str], None] = print) -> Outcome:
    from moekit.data.lmdata import prepare_data

    scale, seeds = scale_and_seeds(settings, QUICK, FULL, "efficiency-leverage")
    data = prepare_data(scale.source, log=log)
    arms = [f"dense-x{b}" for b in DENSE_BUDGETS] + list(MOES)
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        row: dict[str, Any] = {"seed": seed}
        for arm in arms:
            config = run_config(arm, scale, seed, settings)
            trainer, result = train_arm(config, data, log)
            loss = validation_loss(trainer.model, data, scale)["mean"]
            tokens = trainer.tokens_seen
            row[arm] = {
                "val_loss": loss,
                "tokens": tokens,
                "active_parameters": result.parameters["active"],
                "total_parameters": result.parameters["total"],
                "compute": 6.0 * result.parameters["active"] * tokens,
            }
            log(f"{arm} seed {seed}: validation loss {loss:.4f}, compute {row[arm]['compute']:.3g}")
        runs.append(row)
    return outcome(runs, scale, seeds)


def leverage(row: dict[str, Any]) -> dict[str, Any]:
    """One seed's dense fit and every MoE's efficiency leverage."""
    dense = [row[f"dense-x{b}"] for b in DENSE_BUDGETS]
    a, b, r2 = power_law_fit([d["compute"] for d in dense], [d["val_loss"] for d in dense])
    lowest, highest = min(d["compute"] for d in dense), max(d["compute"] for d in dense)
    el = {}
    for name in MOES:
        if b <= 0:  # the dense loss did not fall with compute: no leverage can be read off the fit
            el[name] = {"el": None, "dense_compute_needed": None, "extrapolated": None}
            continue
        needed = compute_for_loss(a, b, row[name]["val_loss"])
        el[name] = {
            "el": needed / row[name]["compute"],
            "dense_compute_needed": needed,
            "extrapolated": not lowest <= needed <= highest,
        }
    return {"fit": {"a": a, "b": b, "r2": r2}, "leverage": el}


def outcome(runs: list[dict[str, Any]], scale: ArmScale, seeds: int) -> Outcome:
    """The checks from the recorded runs (pure: the tests feed it made-up runs)."""
    fits = [leverage(row) for row in runs]
    fitted = all(f["fit"]["b"] > 0 for f in fits)

    def per_seed(value: Callable[[dict[str, Any]], float]) -> Estimate | None:
        """An interval over seeds, or None when a seed's dense loss did not fall with compute."""
        return mean_estimate([value(f["leverage"]) for f in fits]) if fitted else None

    ratio_slope = per_seed(
        lambda el: log_slope([activation_ratio(n) for n in RATIO_ARMS], [el[n]["el"] for n in RATIO_ARMS])
    )
    sparsest = per_seed(lambda el: el[RATIO_ARMS[-1]]["el"])
    granularity_slope = per_seed(
        lambda el: log_slope(
            [granularity(n) for n in GRANULARITY_ARMS], [el[n]["el"] for n in GRANULARITY_ARMS]
        )
    )

    def judged(rule: Callable[[Estimate, float], str], estimate: Estimate | None, bar: float) -> str:
        return rule(estimate, bar) if estimate is not None else INCONCLUSIVE

    checks = [
        Check(
            "EL grows as the activation ratio falls: slope of log EL on log A (A = 1/2, 1/4, 1/8), per seed",
            ratio_slope,
            "95% CI upper bound <= 0",
            judged(verdict_at_most, ratio_slope, 0.0),
            paper="EL a power law in A, lower A gives higher EL (#22)",
        ),
        Check(
            f"the sparsest MoE (A = 1/8) needs less compute than dense for its loss: EL of {RATIO_ARMS[-1]}",
            sparsest,
            "95% CI lower bound >= 1",
            judged(verdict_at_least, sparsest, 1.0),
            paper="over 7x at 1T tokens (Ling-mini-beta, #22)",
        ),
        Check(
            "EL rises with granularity below the optimum: slope of log EL on log G (G = 1, 2, 4), per seed",
            granularity_slope,
            "95% CI lower bound >= 0",
            judged(verdict_at_least, granularity_slope, 0.0),
            paper="optimal granularity about 8-12 (#22)",
        ),
    ]
    mean_el = {
        name: float(np.mean([f["leverage"][name]["el"] for f in fits])) if fitted else None for name in MOES
    }
    results = {
        "scale": scale.__dict__,
        "seeds": seeds,
        "dense_budgets": list(DENSE_BUDGETS),
        "moes": {
            name: {
                "experts": e,
                "top_k": k,
                "activation_ratio": activation_ratio(name),
                "granularity": granularity(name),
            }
            for name, (e, k, _) in MOES.items()
        },
        "runs": runs,
        "fits": fits,
        "mean_el": mean_el,
        "dense_fit_falls_in_every_seed": fitted,
        "ratio_slope": ratio_slope.to_dict() if fitted else None,
        "sparsest_el": sparsest.to_dict() if fitted else None,
        "granularity_slope": granularity_slope.to_dict() if fitted else None,
    }
    return Outcome(CLAIM, checks, results, _sections(results))


def _sections(results: dict[str, Any]) -> list[Any]:
    from moekit.analysis import Section, Table, Text, figure_block, new_figure

    runs, fits = results["runs"], results["fits"]
    rows = []
    for name, info in results["moes"].items():
        rows.append(
            [
                name,
                f"top-{info['top_k']} of {info['experts']}",
                f"{info['activation_ratio']:.3f}",
                f"{info['granularity']:g}",
                f"{np.mean([r[name]['val_loss'] for r in runs]):.4f}",
                "no fit" if results["mean_el"][name] is None else f"{results['mean_el'][name]:.3f}",
                "yes" if any(f["leverage"][name]["extrapolated"] for f in fits) else "no",
            ]
        )
    table = Table(
        ["MoE", "experts", "A", "G", "val loss", "EL", "outside the dense range"],
        rows,
        caption=f"means over {results['seeds']} seeds",
    )
    text = Text(
        "Dense fit per seed, L = a C^-b: "
        + "; ".join(
            f"seed {i}: b = {f['fit']['b']:.4f}, R^2 = {f['fit']['r2']:.3f}" for i, f in enumerate(fits)
        )
    )
    figure = new_figure(5.0, 3.4)
    ax = figure.add_subplot(1, 1, 1)
    seed0, fit = runs[0], fits[0]["fit"]
    dense = [seed0[f"dense-x{b}"] for b in results["dense_budgets"]]
    xs = np.array([d["compute"] for d in dense])
    ax.scatter(xs, [d["val_loss"] for d in dense], label="dense", color="black")
    grid = np.geomspace(xs.min() / 2, xs.max() * 2, 50)
    ax.plot(grid, fit["a"] * grid ** (-fit["b"]), color="black", linewidth=0.8)
    for name in results["moes"]:
        ax.scatter([seed0[name]["compute"]], [seed0[name]["val_loss"]], label=name, marker="x")
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs, 6 N_active D)")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    return [Section("Efficiency leverage", [text, table, figure_block(figure, "seed 0")])]
