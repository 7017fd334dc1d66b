"""`moekit demo` end to end at a few steps: the files and the metrics.json schema it promises."""

import dataclasses
import json

import pytest

from moekit.demo import DEMO_MODEL, SEED_MARGIN, DemoSettings, run_configs, run_demo, run_seeds, seed_summary
from moekit.train.config import RunConfig

pytestmark = pytest.mark.production_threads


def test_dense_and_moe_have_equal_active_ffn_parameters(tmp_path):
    configs = {
        name: RunConfig.from_dict(raw) for name, raw in run_configs(DemoSettings(out_dir=tmp_path)).items()
    }
    dense = configs["dense"].model_config(vocab_size=259)
    moe = configs["moe"].model_config(vocab_size=259)
    expert = moe.moe
    active_moe_ff = expert.router.top_k * expert.ff_size + expert.shared_total_ff
    assert active_moe_ff == dense.ff_size
    # the runs differ only in the FFN and the learning rate: same data, schedule, steps and seed
    assert configs["dense"].data == configs["moe"].data and configs["dense"].loop == configs["moe"].loop
    dense_train, moe_train = configs["dense"].train, configs["moe"].train
    assert (dense_train.lr, moe_train.lr) == (DemoSettings.lr_dense, DemoSettings.lr_moe)
    assert dataclasses.replace(moe_train, lr=dense_train.lr) == dense_train


def test_demo_writes_report_and_metrics(tmp_path):
    settings = DemoSettings(out_dir=tmp_path, source="sample", steps=3, eval_batches=1, progress=False)
    run_demo(settings, log=lambda _: None)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("dense", "moe"):
        val = metrics[name]["val_loss"]
        assert {"code", "english", "multilingual", "math", "structured", "mean"} <= set(val)
        assert all(isinstance(v, float) for v in val.values())
        assert metrics[name]["tokens_per_s"] > 0
    nmi = metrics["moe"]["domain_nmi"]
    assert len(nmi) == DEMO_MODEL["num_layers"] and all(0.0 <= v <= 1.0 for v in nmi)  # one per MoE layer
    timed = metrics["equal_time"]
    assert timed["seconds"] > 0 and all(isinstance(timed[name], float) for name in ("dense", "moe"))
    assert metrics["comparison"]["moe_beats_dense_at_equal_time"] == (timed["moe"] < timed["dense"])
    html = (tmp_path / "report.html").read_text()
    shown = "shows it" if metrics["comparison"]["moe_beats_dense"] else "does not show it"
    assert f"This run {shown}" in html and "At equal training time" in html
    assert "Dense vs MoE" in html and "data:image/png;base64" in html and "<script src" not in html


def test_seed_summary_asks_every_seed_and_twice_the_spread():
    steady = seed_summary({0: 0.050, 1: 0.045, 2: 0.055})
    assert steady["shown"] and steady["min_gain"] == 0.045
    assert abs(steady["mean_gain"] - 0.050) < 1e-12 and abs(steady["spread"] - 0.005) < 1e-12
    one_short = seed_summary({0: 0.080, 1: SEED_MARGIN - 1e-4, 2: 0.070})
    assert not one_short["every_seed_at_least_margin"] and not one_short["shown"]
    noisy = seed_summary({0: 0.031, 1: 0.300, 2: 0.032})  # every seed clears the margin, the spread is wide
    assert noisy["every_seed_at_least_margin"] and not noisy["mean_above_twice_spread"] and not noisy["shown"]
    assert not seed_summary({0: 0.1})["shown"]  # one seed has no spread to compare against


def test_demo_seeds_run_each_seed_and_summarise(tmp_path, monkeypatch):
    import moekit.demo_report

    # the report is test_demo_writes_report_and_metrics's; here only the training and the summary
    monkeypatch.setattr(moekit.demo_report, "analyse_and_report", lambda *a, **k: {"domain_nmi": []})
    settings = DemoSettings(out_dir=tmp_path, source="sample", steps=1, eval_batches=1, progress=False)
    summary = run_seeds(settings, [0, 1], log=lambda _: None)
    assert json.loads((tmp_path / "seeds.json").read_text())["gains"] == summary["gains"]
    losses = {}
    for seed in (0, 1):
        metrics = json.loads((tmp_path / f"seed-{seed}" / "metrics.json").read_text())
        assert metrics["settings"]["seed"] == seed
        dense, moe = metrics["dense"]["val_loss"]["mean"], metrics["moe"]["val_loss"]["mean"]
        assert summary["gains"][str(seed)] == dense - moe
        losses[seed] = (dense, moe)
    assert losses[0] != losses[1]  # the seed changes the initialisation and the data order


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--seeds", "1", "1"], "--seeds"),
        (["--seeds", "0", "-1"], "--seeds"),
        (["--seed", "-2"], "--seed"),
        (["--steps", "0"], "--steps"),
        (["--source", "no-such-corpus"], "--source"),
    ],
)
def test_demo_rejects_bad_input_in_one_line_before_any_work(tmp_path, capsys, argv, field):
    from moekit.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moekit: error: {field}:"), err
    assert not out.exists() or not any(out.iterdir())  # nothing trained, nothing written


def test_demo_run_again_replaces_its_runs_whole(tmp_path, monkeypatch):
    import moekit.demo_report

    monkeypatch.setattr(moekit.demo_report, "analyse_and_report", lambda *a, **k: {"domain_nmi": []})
    for steps in (2, 1):
        settings = DemoSettings(
            out_dir=tmp_path, source="sample", steps=steps, eval_batches=1, progress=False
        )
        run_demo(settings, log=lambda _: None)
    for name in ("dense", "moe"):
        run = tmp_path / name
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["event"] for r in records if "event" in r] == ["start"]  # not the first run's as well
        steps_saved = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
        assert steps_saved == ["step-000001"]  # the first run's step 2 is gone
