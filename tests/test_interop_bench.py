"""`moekit bench hf` at a toy size: every contender runs, the patched model agrees with stock HF
before timing, and the report and table carry every figure."""

import argparse
import json

import pytest

pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)

from moekit.bench import hf as bench  # noqa: E402
from moekit.bench.machine import cpu_line  # noqa: E402


def test_benchmark_runs_agrees_and_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("moekit.runtime.keep_freed_memory", lambda: True)  # leave pytest's malloc alone
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--hidden", "32", "--layers", "1", "--experts", "4", "--top-k", "2", "--expert-ff", "16"]
        + ["--vocab", "64", "--batch", "2", "--seq", "8", "--repeats", "1", "--warmup", "0"]
        + ["--json", str(tmp_path / "bench.json")]
    )
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["style"] for r in report["results"]] == ["qwen3_moe", "olmoe"]
    for row in report["results"]:
        assert set(row["median_s"]) == {"hf_eager", "hf_grouped_mm", "moekit_patch"}
        assert all(t > 0 for t in row["median_s"].values())
        assert row["max_abs_diff_vs_hf_eager"]["moekit_patch"] < 1e-5
    assert report["cpu"]["model"] and report["cpu"]["torch_threads"] >= 1  # figures name their machine
    table = capsys.readouterr().out
    assert "| qwen3_moe-style |" in table and "| olmoe-style |" in table
    assert f"CPU: {cpu_line(report['cpu'])}" in table
