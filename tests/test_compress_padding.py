"""Pruning to a different expert count per layer, stored padded to the largest count."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.compress.calibrate import calibrate
from moekit.compress.padding import PAD_LOGIT, allocate_counts, nonuniform_model, padding_mode
from moekit.compress.prune import prune
from moekit.compress.recipe import recipe_from_dict
from moekit.errors import ConfigError
from test_compress import CONFIGS, random_batches, run, save_lm_run, small_recipe, tiny_lm

pytest.importorskip("scipy")


def logits64(model, ids):
    with torch.no_grad():
        return copy.deepcopy(model).double()(ids).logits


def assert_equal64(a, b):
    """Equal up to float64 rounding (the padded and unpadded layers sum in different orders)."""
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def tiny_family(family, directory, **overrides):
    tiny = pytest.importorskip("moekit.interop.tiny")
    from moekit.interop.hf import from_hf

    tiny.tiny_model(family, **overrides).save_pretrained(directory)
    return from_hf(directory)


def test_masked_padding_equals_the_non_uniform_lm_in_float64():
    model = tiny_lm()
    batches = random_batches(n=2)
    result = prune(model, calibrate(model, batches), "reap", [6, 2])
    assert [k.numel() for k in result.keep] == [6, 2] and result.padding.mode == "mask"
    padded = result.padding.model
    assert [m.experts.num_experts for m in padded.moe_layers] == [6, 6]
    bias = padded.moe_layers[1].router.bias
    assert sorted(bias.tolist()) == [PAD_LOGIT] * 4 + [0.0] * 2  # 4 padding slots, masked
    ids = batches[0]["input_ids"]
    reference = nonuniform_model(model, result.keep)
    assert [m.experts.num_experts for m in reference.moe_layers] == [6, 2]
    assert_equal64(logits64(padded, ids), logits64(reference, ids))
    # and it is a real prune: different from the original and from keeping 6 everywhere
    assert not torch.allclose(logits64(padded, ids), logits64(model, ids))
    uniform = prune(model, calibrate(model, batches), "reap", 6).model
    assert not torch.allclose(logits64(padded, ids), logits64(uniform, ids))
    layers = result.padding.layers
    assert [layer["padded"] for layer in layers] == [0, 4]
    per_expert = 2 * 16 * 32 + 16 * 32 + 32 + 1  # w_in (gate and up), w_out, router row and bias
    assert layers[1]["padding_bytes"] == 4 * per_expert * 4  # 4 experts in fp32
    assert sorted(layers[1]["kept"] + layers[1]["removed"]) == list(range(8))


@pytest.mark.parametrize(
    "family,overrides,keep",
    [
        ("gpt_oss", {}, [4, 2]),  # router bias
        ("deepseek_v3", dict(n_group=2, topk_group=1, num_hidden_layers=3), [6, 4]),  # selection bias, groups
        ("mixtral", {}, [4, 2]),  # neither: restored experts
    ],
)
def test_padded_hf_folders_load_in_transformers(family, overrides, keep, tmp_path):
    transformers = pytest.importorskip("transformers")
    from moekit.interop.hf import to_hf

    model = tiny_family(family, tmp_path / "src", **overrides)
    batches = random_batches(n=2)
    result = prune(model, calibrate(model, batches), "reap", keep)
    ids = batches[0]["input_ids"]
    padded = result.padding.model
    if family == "mixtral":
        assert result.padding.mode == "restore"
        restored = result.padding.layers[1]["restored"]
        assert len(restored) == 2 and not set(restored) & set(result.keep[1].tolist())
        layers = result.padding.layers
        grown = [
            torch.tensor(sorted(k.tolist() + r["restored"])) for k, r in zip(result.keep, layers, strict=True)
        ]
        torch.testing.assert_close(logits64(padded, ids), logits64(nonuniform_model(model, grown), ids))
    else:
        assert result.padding.mode == "mask"
        reference = nonuniform_model(model, result.keep)
        assert_equal64(logits64(padded, ids), logits64(reference, ids))
    out = to_hf(padded, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert max(keep) in config.values() or max(keep) == config.get("n_routed_experts")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, padded(ids).logits, atol=2e-4, rtol=2e-4)


def test_padding_mode_follows_the_router():
    assert padding_mode(tiny_lm()) == ("mask", "router.bias")


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.lists(st.floats(0, 10), min_size=8, max_size=8), min_size=1, max_size=4),
    st.integers(2, 8),
    st.sampled_from([1, 2]),
)
def test_global_allocation_respects_the_floor_and_the_groups(rows, per_layer, step):
    scores = [torch.tensor(r, dtype=torch.float64) for r in rows]
    counts = allocate_counts(scores, per_layer * len(rows), 2, step)
    assert all(2 <= c <= 8 and c % step == 0 for c in counts)
    if step == 1 and per_layer >= 2:  # no rounding, floor below the share: the budget is met
        assert sum(counts) >= per_layer * len(rows)


def test_global_allocation_gives_more_experts_to_the_flatter_layer():
    flat = torch.ones(8, dtype=torch.float64)
    peaked = torch.tensor([100.0, 90, 1, 1, 1, 1, 1, 1], dtype=torch.float64)
    counts = allocate_counts([peaked, flat], 8, 2, 1)
    assert counts[0] < counts[1] and sum(counts) == 8


def test_recipe_fields_are_checked():
    assert recipe_from_dict({"method": "prune", "prune": {"keep": [6, 4]}}).prune.keep == (6, 4)
    for bad, field in (
        ({"keep": [6, 0]}, "prune.keep[1]"),
        ({"keep": [6, 4], "allocation": "global"}, "prune.allocation"),
        ({"score": "stun", "allocation": "global"}, "prune.allocation"),
        ({"padding": "zeros"}, "prune.padding"),
    ):
        with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
            recipe_from_dict({"method": "prune", "prune": bad})


def test_bad_counts_are_refused_before_work():
    model = tiny_lm()
    calibration = calibrate(model, random_batches(n=1))
    with pytest.raises(ConfigError, match="2 MoE layers"):
        prune(model, calibration, "reap", [4, 4, 4])
    with pytest.raises(ConfigError, match=r"prune.keep\[1\]"):
        prune(model, calibration, "reap", [4, 1])


def test_cli_reports_kept_removed_padded_and_bytes(tmp_path, capsys):
    import yaml

    save_lm_run(tmp_path / "run")
    recipe = small_recipe(tmp_path / "r.yaml", CONFIGS / "prune-reap.yaml")
    data = yaml.safe_load(recipe.read_text())
    data["prune"] = {"score": "reap", "keep": [6, 3]}
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert run(tmp_path / "run", "--recipe", recipe, "--calib", "sample", "--out", out) == 0
    assert "padded to 6" in capsys.readouterr().out
    report = json.loads((out / "compress_report.json").read_text())
    padding = report["padding"]
    assert padding["mode"] == "mask" and padding["experts_kept"] == [6, 3]
    assert [layer["padded"] for layer in padding["layers"]] == [0, 3]
    assert padding["padding_bytes"] == padding["layers"][1]["padding_bytes"] > 0
    assert report["experts_per_layer"]["after"] == 6
    from moekit.analysis.cli import LoadedModel

    reloaded = LoadedModel(out).model
    assert reloaded.moe_layers[1].router.bias is not None


def test_mask_padding_is_refused_where_the_router_cannot_mask(tmp_path, capsys):
    import yaml

    from test_compress import family_checkpoint, save_char_tokenizer

    src = family_checkpoint("mixtral", tmp_path / "src")
    save_char_tokenizer(src)
    capsys.readouterr()  # the checkpoint writer's progress bar
    recipe = small_recipe(tmp_path / "r.yaml", CONFIGS / "prune-reap.yaml")
    data = yaml.safe_load(recipe.read_text())
    data["prune"] = {"keep": [4, 2], "padding": "mask"}
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "o"
    assert run(src, "--recipe", recipe, "--calib", "sample", "--out", out) == 2
    err = capsys.readouterr().err
    assert "prune.padding" in err and err.count("\n") == 1 and not out.exists()
