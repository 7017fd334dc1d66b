"""`moekit experiment leave-one-out` (#1): the verdicts on made-up runs, arms that differ only in
the FFN (equal active width) and never train on the held-out domain, and the quick path end to end."""

import json
from pathlib import Path

import numpy as np
import pytest

from moekit import cli
from moekit.experiments import leave_one_out, runner
from moekit.experiments.stats import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


def fake_runs(dense_heldout, moe_heldout, dense_seen, moe_seen, nmi):
    return [
        {
            "holdout": ["code", "math"][i % 2],
            "seed": i // 2,
            "dense": {"heldout_loss": dh, "seen_loss": ds},
            "moe": {"heldout_loss": mh, "seen_loss": ms, "nmi_all_domains": [n, n]},
        }
        for i, (dh, mh, ds, ms, n) in enumerate(
            zip(dense_heldout, moe_heldout, dense_seen, moe_seen, nmi, strict=True)
        )
    ]


def test_verdicts_follow_the_paired_intervals():
    wins = fake_runs(
        [3.0, 3.2, 3.1, 3.3], [2.9, 3.1, 3.0, 3.15], [2.0] * 4, [1.9, 1.92, 1.91, 1.9], [0.4] * 4
    )
    outcome = leave_one_out.outcome(wins, leave_one_out.QUICK, 2)
    assert [c.verdict for c in outcome.checks] == [REPRODUCED] * 3 and outcome.verdict == REPRODUCED
    assert outcome.results["heldout_gain_nats"]["value"] == pytest.approx(np.mean([0.1, 0.1, 0.1, 0.15]))
    assert outcome.results["heldout_loss_per_domain"]["code"] == {"dense": 3.05, "moe": pytest.approx(2.95)}
    loses = fake_runs(
        [2.0, 2.1, 2.0, 2.1], [2.5, 2.6, 2.5, 2.65], [2.0] * 4, [1.9, 1.92, 1.91, 1.9], [0.01] * 4
    )
    outcome = leave_one_out.outcome(loses, leave_one_out.QUICK, 2)
    assert outcome.checks[0].verdict == NOT_REPRODUCED and outcome.checks[2].verdict == NOT_REPRODUCED
    noisy = fake_runs([3.0, 2.0, 3.0, 2.0], [2.5, 2.5, 2.5, 2.5], [2.0] * 4, [1.9] * 4, [0.1, 0.5, 0.1, 0.5])
    outcome = leave_one_out.outcome(noisy, leave_one_out.QUICK, 2)
    assert outcome.checks[0].verdict == INCONCLUSIVE and outcome.checks[2].verdict == INCONCLUSIVE


def test_the_arms_differ_only_in_the_ffn_at_equal_active_width():
    from moekit.train.config import RunConfig

    settings = runner.ExperimentSettings(out_dir=Path("unused"))
    configs = {
        arm: leave_one_out.run_config(arm, "math", leave_one_out.FULL, 0, settings)
        for arm in leave_one_out.ARMS
    }
    models = {arm: RunConfig.from_dict(c).model_config(vocab_size=259) for arm, c in configs.items()}
    moe = models["moe"].moe
    assert models["dense"].moe is None and models["dense"].ff_size == moe.router.top_k * moe.ff_size
    for config in configs.values():
        assert config["data"]["holdout"] == "math"
        config.pop("model"), config.pop("balance"), config.pop("name"), config.pop("out_dir")
    assert configs["dense"] == configs["moe"]


def test_the_training_stream_never_holds_the_held_out_domain():
    from moekit.data.lmdata import prepare_data

    data = prepare_data("sample", holdout="math", log=lambda _: None)
    stream = data.train_batches(8, 64, seed=0)
    seen = set()
    for _ in range(20):
        batch = next(stream)
        seen |= {data.domains[x] for x in batch.domains[batch.domains >= 0].tolist()}
    assert "math" not in seen and len(seen) == 4


def test_quick_run_end_to_end(tmp_path):
    argv = ["experiment", "leave-one-out", "--quick", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["experiment"] == "leave-one-out" and results["quick"] is True
    assert results["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE) and len(results["checks"]) == 3
    runs = results["results"]["runs"]
    assert len(runs) == leave_one_out.QUICK_HOLDOUTS * leave_one_out.QUICK.seeds
    for run in runs:
        for arm in leave_one_out.ARMS:
            assert (
                np.isfinite(run[arm]["heldout_loss"])
                and run[arm]["val_loss"][run["holdout"]] == run[arm]["heldout_loss"]
            )
        assert run["dense"]["parameters"]["active"] < run["moe"]["parameters"]["total"]
        assert all(0 <= v <= 1 for v in run["moe"]["nmi_all_domains"])
    assert "Leave one domain out" in (tmp_path / "report.html").read_text()
