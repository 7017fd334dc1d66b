"""moekit's REAP keeps the experts llm-compressor's `REAPPruningModifier` keeps, on the same model
and calibration tokens (stored fixtures, and a live llm-compressor run).

The fixtures under tests/fixtures/reap/ were made by llmcompressor 0.14.0.1 with `make_fixtures.py`
there (its docstring says how to regenerate them). llm-compressor is not a moekit dependency (it
pins transformers<=5.17.0); set MOEKIT_LLMCOMPRESSOR_PYTHON to a Python that has it to also
compare with a live run.

Both compute the saliency in float32 and accumulate in float64: the saliencies agree to 1e-5
relative; the kept sets are equal.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.compress.calibrate import calibrate
from moekit.compress.prune import prune

FIXTURES = Path(__file__).parent / "fixtures" / "reap"
RECORD = json.loads((FIXTURES / "cases.json").read_text())

pytest.importorskip("transformers")


def moekit_reap(name: str, sparsity: float) -> tuple[list[list[int]], list[torch.Tensor]]:
    """moekit's kept experts and REAP saliencies per MoE layer on the stored case `name`."""
    from moekit.interop.hf import from_hf

    root = FIXTURES / "inputs" / name
    model = from_hf(root)
    ids = load_file(root / "calibration.safetensors")["input_ids"]
    calibration = calibrate(model, [{"input_ids": ids[i : i + 1]} for i in range(ids.shape[0])])
    num = calibration.layers[0].num_experts
    keep = num - int(num * sparsity)  # llm-compressor drops int(E * sparsity) per layer
    result = prune(model, calibration, "reap", keep)
    return [k.tolist() for k in result.keep], result.scores


def compare(record: dict) -> None:
    for name, case in record["cases"].items():
        kept, scores = moekit_reap(name, case["sparsity"])
        assert kept == case["retained"], name
        for ours, theirs in zip(scores, case["saliency"], strict=True):
            torch.testing.assert_close(ours, torch.tensor(theirs, dtype=torch.float64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(RECORD["cases"]))
def test_moekit_reap_keeps_the_experts_llmcompressor_keeps(name):
    compare({"cases": {name: RECORD["cases"][name]}})
    case = RECORD["cases"][name]
    flat = [s for layer in case["saliency"] for s in layer]
    assert len(set(flat)) == len(flat)  # no ties: the kept set is decided by the scores alone


def test_moekit_reap_equals_a_live_llmcompressor_run(tmp_path):
    python = os.environ.get("MOEKIT_LLMCOMPRESSOR_PYTHON")
    if python is None:
        pytest.skip(
            "MOEKIT_LLMCOMPRESSOR_PYTHON is not set (llm-compressor pins its own transformers; "
            "stored fixtures used)"
        )
    subprocess.run(
        [python, str(FIXTURES / "make_fixtures.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    live = json.loads((tmp_path / "cases.json").read_text())
    assert set(live["cases"]) == set(RECORD["cases"])
    compare(live)
