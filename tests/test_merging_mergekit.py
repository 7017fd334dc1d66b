"""moekit's merges equal mergekit's on the same inputs (stored fixtures, and a live mergekit run).

The fixtures under tests/fixtures/merging/ were made by mergekit 0.1.5 with `make_fixtures.py`
there (its docstring says how to regenerate them). mergekit is not a moekit dependency (it pins its
own transformers); set MOEKIT_MERGEKIT_PYTHON to a Python that has it to also compare with a live
run, or install it beside moekit.

Tolerance: 1e-6 absolute on float32 tensors of magnitude ~1 (both compute in float32; DARE cases
compare (moekit - base) * (1 - p) with mergekit's unrescaled output, one extra rounding).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.merging import merge_state_dicts, tensor_seed

FIXTURES = Path(__file__).parent / "fixtures" / "merging"
CASES = json.loads((FIXTURES / "cases.json").read_text())
TOLERANCE = 1e-6


def _inputs(family: str) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    root = FIXTURES / "inputs" / family
    models = sorted(p for p in root.iterdir() if p.name.startswith("ft"))
    return load_file(root / "base" / "model.safetensors"), [
        load_file(p / "model.safetensors") for p in models
    ]


def _moekit(case: dict, **extra) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    base, finetuned = _inputs(case["family"])
    return base, merge_state_dicts(
        base, finetuned, case["moekit"]["method"], **case["moekit"]["params"], **extra
    )


def _max_difference(case: dict, mergekit_dir: Path, **extra) -> float:
    base, ours = _moekit(case, **extra)
    theirs = load_file(mergekit_dir / "model.safetensors")
    assert set(theirs) == set(ours)
    drop = case["moekit"]["params"].get("drop_rate", 0.0)
    worst = 0.0
    for name, tensor in ours.items():
        mine = (tensor - base[name]) * (1 - drop) if drop else tensor
        other = theirs[name] - base[name] if drop else theirs[name]
        worst = max(worst, float((mine - other).abs().max()))
    return worst


# The fused-expert case differs on purpose: mergekit thresholds the whole (E, 2I, H) tensor, moekit
# each expert; with experts={} (no fused tensors) moekit thresholds it whole too and must agree.
_GLOBAL = {"qwen3_moe_ties": {"experts": {}}}


@pytest.mark.parametrize("name", sorted(CASES["cases"]))
def test_moekit_equals_stored_mergekit_output(name):
    case = CASES["cases"][name]
    assert _max_difference(case, FIXTURES / "mergekit" / name, **_GLOBAL.get(name, {})) <= TOLERANCE


def test_the_fixture_script_seeds_dare_like_moekit():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base, _ = _inputs("llama")
    assert CASES["dare_seed"] == script.SEED
    assert all(script.tensor_seed(script.SEED, n) == tensor_seed(script.SEED, n) for n in base)
    assert CASES["cases"] == script.CASES  # the stored record is what the script runs


def test_fused_experts_are_thresholded_per_expert_unlike_mergekit():
    """mergekit's TIES on the fused expert tensor: expert 0 (20x larger update) takes nearly all of
    the tensor's 25%; moekit keeps 25% of each expert."""
    case = CASES["cases"]["qwen3_moe_ties"]
    theirs = load_file(FIXTURES / "mergekit" / "qwen3_moe_ties" / "model.safetensors")
    base, ours = _moekit(case)
    assert _max_difference(case, FIXTURES / "mergekit" / "qwen3_moe_ties") > 1e-3  # really differs
    name = "model.layers.0.mlp.experts.gate_up_proj"
    experts = base[name].shape[0]
    kept_ours = ((ours[name] - base[name]).reshape(experts, -1) != 0).sum(1)
    kept_theirs = ((theirs[name] - base[name]).reshape(experts, -1) != 0).sum(1)
    per_expert = base[name][0].numel()
    share = int(0.25 * per_expert)
    assert bool((kept_ours >= share).all()) and bool((kept_ours <= 2 * share).all()), kept_ours.tolist()
    assert int(kept_theirs[1:].sum()) < int(kept_ours[1:].sum()) // 4, kept_theirs.tolist()
    # tensors that are not fused experts merge the same in both
    for other in base:
        if ".experts." not in other:
            torch.testing.assert_close(ours[other], theirs[other], rtol=0, atol=TOLERANCE)


def _live_mergekit(tmp_path: Path) -> Path | None:
    python = os.environ.get("MOEKIT_MERGEKIT_PYTHON")
    if python is None and importlib.util.find_spec("mergekit") is not None:
        python = sys.executable
    if python is None:
        return None
    subprocess.run(
        [python, str(FIXTURES / "make_fixtures.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return tmp_path


def test_moekit_equals_a_live_mergekit_run(tmp_path):
    live = _live_mergekit(tmp_path)
    if live is None:
        pytest.skip(
            "mergekit is not installed here and MOEKIT_MERGEKIT_PYTHON is not set (stored fixtures used)"
        )
    record = json.loads((live / "cases.json").read_text())
    for name, case in record["cases"].items():
        assert _max_difference(case, live / "mergekit" / name, **_GLOBAL.get(name, {})) <= TOLERANCE, name
