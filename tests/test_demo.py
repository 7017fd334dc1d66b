"""`moekit demo` end to end at a few steps: the files and the metrics.json schema it promises."""

import json

import pytest

from moekit.demo import DEMO_MODEL, DemoSettings, run_configs, run_demo
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
    # the runs differ only in the FFN: same data, schedule and seed
    assert configs["dense"].data == configs["moe"].data and configs["dense"].train == configs["moe"].train


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
