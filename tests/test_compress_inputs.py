"""Bad compression recipes: a section of another method, a calibration.seq_len above the model's
positions; refused with one line before the calibration pass, nothing written."""

import pytest

from moekit.compress.recipe import CalibrationRecipe, load_recipe, recipe_from_dict
from moekit.errors import ConfigError

pytest.importorskip("scipy")

from test_compress import run, save_lm_run  # noqa: E402  (tiny_lm: 64 positions)


@pytest.mark.parametrize(
    "method, other",
    [
        ("merge", "prune"),
        ("prune", "quantize"),
        ("quantize", "merge"),
        ("premoe", "prune"),
        ("prune", "premoe"),
    ],
)
def test_a_section_of_another_method_is_refused_naming_it(method, other):
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({"method": method, other: {}})
    assert info.value.field == other and f"method is {method}" in str(info.value)
    recipe_from_dict({"method": method, method: {}, "calibration": {}, "evaluation": {}})  # its own: fine


def test_calibration_seq_len_above_the_model_is_refused_and_the_default_fits():
    assert CalibrationRecipe().resolved_seq_len(32) == 32  # documented default: 128, or fewer positions
    assert CalibrationRecipe().resolved_seq_len(None) == 128
    assert CalibrationRecipe(seq_len=32).resolved_seq_len(64) == 32
    with pytest.raises(ConfigError) as info:
        CalibrationRecipe(seq_len=128).resolved_seq_len(32)
    assert info.value.field == "calibration.seq_len" and "max_seq_len=32" in str(info.value)
    with pytest.raises(ConfigError, match="calibration.seq_len"):
        CalibrationRecipe(seq_len=0)


def test_cli_refuses_both_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import moekit.compress.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("calibration started before the recipe was checked")

    monkeypatch.setattr(pipeline, "calibrate", refuse)
    save_lm_run(tmp_path / "run")
    out = tmp_path / "out"
    cases = {
        "method: merge\nmerge: {keep: 0.5}\nprune: {score: reap, keep: 0.5}\n": (
            "prune: a section of method prune"
        ),
        "method: prune\nprune: {keep: 0.5}\ncalibration: {batches: 2, batch_size: 2, seq_len: 128}\n": (
            "calibration.seq_len: got 128, above the max_seq_len=64"
        ),
    }
    for text, message in cases.items():
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text)
        assert run(tmp_path / "run", "--recipe", recipe, "--calib", "sample", "--out", out) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_shipped_recipes_still_load():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs" / "compress").glob("*.yaml")):
        load_recipe(path)
