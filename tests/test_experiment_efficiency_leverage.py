"""`moekit experiment efficiency-leverage` (#22): the power-law fit and its inverse against float64
references, EL on runs made from a known law, the verdicts, equal active width, and the quick path."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import cli
from moekit.errors import MoekitError
from moekit.experiments import efficiency_leverage as el
from moekit.experiments import runner
from moekit.experiments.stats import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


@settings(deadline=None, max_examples=25)
@given(st.floats(1.0, 50.0), st.floats(0.01, 0.5), st.floats(1e6, 1e9))
def test_the_power_law_fit_recovers_a_known_law_and_inverts_it(a, b, c0):
    compute = c0 * np.array([0.5, 1.0, 2.0, 4.0])
    loss = a * compute ** (-b)
    fa, fb, r2 = el.power_law_fit(compute, loss)
    assert fa == pytest.approx(a, rel=1e-6) and fb == pytest.approx(b, rel=1e-6) and r2 == pytest.approx(1.0)
    assert el.compute_for_loss(fa, fb, float(a * (3 * c0) ** (-b))) == pytest.approx(3 * c0, rel=1e-6)


def test_a_flat_dense_curve_is_refused():
    with pytest.raises(MoekitError, match="does not fall"):
        el.compute_for_loss(5.0, 0.0, 4.0)
    with pytest.raises(MoekitError, match="two or more"):
        el.power_law_fit([1.0, 1.0], [2.0, 3.0])


def law_runs(leverage_of, seeds=3, a=20.0, b=0.1, noise=0.0):
    """Runs whose dense losses follow L = a C^-b exactly, and each MoE's loss is the dense loss at
    `leverage_of[name]` times its own compute (so its EL is that number)."""
    rng = np.random.default_rng(0)
    runs = []
    for seed in range(seeds):
        row = {"seed": seed}
        for budget in el.DENSE_BUDGETS:
            c = 1e8 * budget
            row[f"dense-x{budget}"] = {"val_loss": a * c ** (-b), "compute": c}
        for name in el.MOES:
            c = 1.02e8
            factor = leverage_of[name] * np.exp(noise * rng.normal())
            row[name] = {"val_loss": a * (factor * c) ** (-b), "compute": c}
        runs.append(row)
    return runs


def test_leverage_is_read_off_the_dense_law():
    target = {"A1/2": 1.2, "A1/4": 1.8, "A1/8": 2.7, "A1/4-G2": 2.2, "A1/4-G4": 2.6}
    outcome = el.outcome(law_runs(target), el.QUICK, 3)
    for name, value in target.items():
        assert outcome.results["mean_el"][name] == pytest.approx(value, rel=1e-9)
    assert outcome.results["fits"][0]["leverage"]["A1/2"]["extrapolated"] is False
    assert [c.verdict for c in outcome.checks] == [REPRODUCED] * 3 and outcome.verdict == REPRODUCED
    reversed_trend = {"A1/2": 2.7, "A1/4": 1.8, "A1/8": 0.6, "A1/4-G2": 1.2, "A1/4-G4": 0.9}
    outcome = el.outcome(law_runs(reversed_trend), el.QUICK, 3)
    assert [c.verdict for c in outcome.checks] == [NOT_REPRODUCED] * 3
    flat = {name: 1.0 for name in el.MOES}
    outcome = el.outcome(law_runs(flat, noise=0.3), el.QUICK, 3)
    assert outcome.checks[0].verdict == INCONCLUSIVE
    rising = law_runs(target, b=-0.05)  # a dense loss that grows with compute: nothing to read off
    outcome = el.outcome(rising, el.QUICK, 3)
    assert [c.verdict for c in outcome.checks] == [INCONCLUSIVE] * 3 and outcome.results["mean_el"][
        "A1/2"
    ] is None
    assert "no fit" in outcome.sections[0].blocks[1].rows[0][5]


def test_every_moe_has_the_dense_models_active_ffn_width():
    from moekit.train.config import RunConfig

    settings_ = runner.ExperimentSettings(out_dir=Path("unused"))
    widths, steps = {}, {}
    for arm in [f"dense-x{b}" for b in el.DENSE_BUDGETS] + list(el.MOES):
        config = RunConfig.from_dict(el.run_config(arm, el.FULL, 0, settings_))
        model = config.model_config(vocab_size=259)
        widths[arm] = model.ff_size if model.moe is None else model.moe.router.top_k * model.moe.ff_size
        steps[arm] = config.train.steps
        if model.moe is not None:
            assert model.moe.router.top_k / model.moe.router.num_experts == el.activation_ratio(arm)
    assert len(set(widths.values())) == 1, widths
    assert [steps[f"dense-x{b}"] for b in el.DENSE_BUDGETS] == [
        round(el.FULL.steps * b) for b in el.DENSE_BUDGETS
    ]
    assert {steps[m] for m in el.MOES} == {el.FULL.steps}


def test_quick_run_end_to_end(tmp_path):
    argv = ["experiment", "efficiency-leverage", "--quick", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["experiment"] == "efficiency-leverage" and results["verdict"] in (
        REPRODUCED,
        NOT_REPRODUCED,
        INCONCLUSIVE,
    )
    assert len(results["checks"]) == 3 and len(results["results"]["runs"]) == el.QUICK.seeds
    for fit in results["results"]["fits"]:
        assert fit["fit"]["b"] > 0  # the dense loss falls with compute even at this size
        assert all(np.isfinite(v["el"]) and v["el"] > 0 for v in fit["leverage"].values())
    run = results["results"]["runs"][0]
    assert run["dense-x4.0"]["tokens"] == 8 * run["dense-x0.5"]["tokens"]
    assert "Efficiency leverage" in (tmp_path / "report.html").read_text()
