"""`moekit experiment imbalance-curriculum` (#2): the stage budget, the stages doing what they say
(the router stage moves the routers and nothing else, the fused MoE starts from the proto-experts'
FFNs), the verdicts on made-up runs, and the quick path end to end."""

import json
from pathlib import Path

import pytest
import torch

from moekit import cli
from moekit.experiments import imbalance_curriculum as ic
from moekit.experiments import runner
from moekit.experiments.stats import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


@pytest.mark.parametrize("total", [8, 24, 40, 400, 1001])
def test_the_stages_add_up_to_the_joint_arms_step_count(total):
    steps = ic.stage_steps(total)
    assert 2 * steps["proto"] + steps["router"] + steps["joint"] == total
    assert min(steps.values()) >= 1


def test_the_mixtures_are_ten_to_one_and_one_to_one():
    mixtures = ic.mixtures()
    imbalanced = mixtures["imbalanced"]
    assert imbalanced[ic.MAJORITY] / imbalanced[ic.MINORITY] == pytest.approx(10.0)
    assert sum(imbalanced.values()) == pytest.approx(1.0) and set(mixtures["balanced"].values()) == {0.5}


def test_the_stages_train_what_they_say(monkeypatch, tmp_path):
    from moekit.data.lmdata import prepare_data
    from moekit.experiments.mixture import MixtureData

    stages = []
    original = ic.build_trainer

    def recording(config, data, log):
        trainer = original(config, data, log)
        run = trainer.run

        def run_and_record():
            before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            result = run()
            stages.append((config["name"], before, trainer.model.state_dict()))
            return result

        trainer.run = run_and_record
        return trainer

    monkeypatch.setattr(ic, "build_trainer", recording)
    scale = ic.QUICK.__class__(**{**ic.QUICK.__dict__, "steps": 12})
    settings_ = runner.ExperimentSettings(out_dir=tmp_path, quick=True, progress=False)
    base = prepare_data(scale.source, log=lambda _: None)
    data = {name: MixtureData(base, w) for name, w in ic.mixtures().items()}
    model = ic.curriculum(scale, 0, settings_, base, data, lambda _: None)
    names = [name for name, _, _ in stages]
    assert [n.split("-seed")[0] for n in names] == [
        f"curriculum-proto-{ic.MAJORITY}",
        f"curriculum-proto-{ic.MINORITY}",
        "curriculum-router",
        "curriculum-joint",
    ]
    protos = [after for _, _, after in stages[:2]]
    _, router_before, router_after = stages[2]
    for layer in range(scale.layers):  # the fused MoE's expert e is proto-expert e's FFN
        for e, proto in enumerate(protos):
            for moe_key, dense_key in (("w_in", "proj_in.weight"), ("w_out", "proj_out.weight")):
                fused = router_before[f"blocks.{layer}.ffn.experts.{moe_key}"][e]
                assert torch.equal(fused, proto[f"blocks.{layer}.ffn.{dense_key}"])
    moved = {k for k in router_before if not torch.equal(router_before[k], router_after[k])}
    assert moved and all(".ffn.router." in k for k in moved)
    _, joint_before, joint_after = stages[3]
    assert any(
        not torch.equal(joint_before[k], joint_after[k]) for k in joint_before if ".ffn.router." not in k
    )
    assert all(torch.equal(joint_after[k], v) for k, v in model.state_dict().items())


def fake_runs(minority, majority=None):
    return {
        arm: [
            {"seed": i, "val_loss": {ic.MINORITY: m, ic.MAJORITY: (majority or {}).get(arm, 3.0), "mean": m}}
            for i, m in enumerate(minority[arm])
        ]
        for arm in ic.ARMS
    }


def test_verdicts_follow_the_seed_paired_intervals():
    wins = fake_runs(
        {"naive": [3.0, 3.1, 3.05], "rebalanced": [2.9, 3.0, 2.95], "curriculum": [2.8, 2.9, 2.84]}
    )
    outcome = ic.outcome(wins, ic.QUICK, 3)
    assert [c.verdict for c in outcome.checks] == [REPRODUCED] * 2 and outcome.verdict == REPRODUCED
    assert outcome.results["minority_gain_vs_naive"]["value"] == pytest.approx(0.2033, abs=1e-3)
    loses = fake_runs(
        {"naive": [2.5, 2.6, 2.55], "rebalanced": [2.9, 3.0, 2.95], "curriculum": [2.8, 2.9, 2.84]}
    )
    outcome = ic.outcome(loses, ic.QUICK, 3)
    assert outcome.checks[0].verdict == NOT_REPRODUCED and outcome.checks[1].verdict == REPRODUCED
    noisy = fake_runs(
        {"naive": [3.0, 2.0, 3.05], "rebalanced": [2.9, 3.0, 2.95], "curriculum": [2.8, 2.9, 2.84]}
    )
    assert ic.outcome(noisy, ic.QUICK, 3).checks[0].verdict == INCONCLUSIVE


def test_quick_run_end_to_end(tmp_path):
    argv = ["experiment", "imbalance-curriculum", "--quick", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["experiment"] == "imbalance-curriculum" and results["verdict"] in (
        REPRODUCED,
        NOT_REPRODUCED,
        INCONCLUSIVE,
    )
    for arm in ic.ARMS:
        assert len(results["results"]["runs"][arm]) == ic.QUICK.seeds
    # the arms end as different models
    losses = {arm: results["results"]["runs"][arm][0]["val_loss"][ic.MINORITY] for arm in ic.ARMS}
    assert len(set(losses.values())) == 3
    assert "10:1 imbalance" in (tmp_path / "report.html").read_text()
    assert Path(tmp_path / "runs").is_dir()
