"""The layer benchmark's harness: every contender computes the same layer, and the JSON has the
documented shape."""

import json

import torch

from moekit.bench.layer import SHAPES, contenders_for, run_layer_benchmark


def test_contenders_compute_the_same_moe_layer():
    notes: list[str] = []
    contenders = {c.impl: c for c in contenders_for(SHAPES["very_fine"], ["hf"], notes)}
    x = torch.randn(16, SHAPES["very_fine"].hidden)
    with torch.no_grad():
        ours = contenders["moekit"].run(x)
        for impl in ("hf_eager", "hf_grouped_mm"):
            torch.testing.assert_close(contenders[impl].run(x), ours, rtol=1e-4, atol=1e-5)
        # both dense references compute the same chain, on different GEMM kernels
        contenders["dense_torch"].module.load_state_dict(contenders["dense"].module.state_dict())
        torch.testing.assert_close(
            contenders["dense"].run(x), contenders["dense_torch"].run(x), rtol=1e-4, atol=1e-5
        )


def test_report_shape(tmp_path):
    report = run_layer_benchmark(
        ["very_fine"], [8], ["fwd", "fwd_bwd"], [], repeats=1, warmup=0, progress=lambda _: None
    )
    path = tmp_path / "layer.json"
    path.write_text(json.dumps(report))
    saved = json.loads(path.read_text())
    results = saved["results"]
    round_trip = saved["settings"]["thread_round_trip_us"]
    assert 0 < round_trip["before"] < 1e6 and 0 < round_trip["after"] < 1e6
    assert {r["impl"] for r in results} == {"moekit", "dense", "dense_torch"}
    for r in results:
        assert r["shape"] == "very_fine" and r["tokens"] == 8 and r["mode"] in ("fwd", "fwd_bwd")
        assert r["median_s"] > 0
        if r["impl"] == "dense":
            assert r["ratio_vs_dense"] == 1.0
