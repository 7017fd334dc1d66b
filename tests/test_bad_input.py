"""Bad input everywhere gives one clear line naming the problem and exit status 2, never a
traceback, and damages nothing on disk: every config field given wrong values (hypothesis over the
whole schema), files that are not YAML, damaged or edited checkpoints, a checkpoint of another
config, unknown options, output paths that cannot be written, missing optional dependencies."""

import contextlib
import hashlib
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.cli import main as cli_main
from moekit.config_tree import apply_overrides
from moekit.errors import ConfigError, MoekitError
from moekit.train.checkpoint import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, resolve_checkpoint
from moekit.train.config import RunConfig

pytestmark = pytest.mark.production_threads

# A config with every section and a MoE model written out in full, so that every field of the
# schema is a path the property test can draw.
MODEL = {
    "vocab_size": "auto",
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "ff_size": 64,
    "max_seq_len": 32,
    "moe": {
        "ff_size": 16,
        "router": {"preset": "deepseek_v3", "num_experts": 8, "top_k": 2, "num_groups": 2, "topk_groups": 1},
        "num_shared_experts": 1,
    },
}


def full_config(out_dir: str = "runs/bad-input") -> dict:
    config = RunConfig.from_dict(
        {
            "name": "bad",
            "out_dir": out_dir,
            "model": MODEL,
            "data": {"source": "sample", "seq_len": 32},
            "train": {"steps": 2, "micro_batch_size": 4, "warmup_steps": 1},
            "loop": {"log_every": 1, "eval_batches": 1, "progress": False},
            "balance": {
                "objectives": [{"kind": "load_balance", "scope": "global", "coefficient": 0.01}],
                "bias_update_rate": 0.01,
            },
        }
    )
    data = config.to_dict()
    data["model"] = {**config.model_config(256).to_dict(), "vocab_size": "auto"}
    return data


def leaf_paths(node, prefix=()) -> list[str]:
    if isinstance(node, dict) and node:
        return [p for key, value in node.items() for p in leaf_paths(value, (*prefix, key))]
    return [".".join(prefix)]


FIELDS = [*leaf_paths(full_config()), "model.init_from"]

values = st.one_of(
    st.text(max_size=6),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2),
)
override_text = st.one_of(
    values.map(
        lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    ),
    st.text(max_size=8),  # raw text, parsed as YAML where it is YAML
)
fields = st.one_of(
    st.sampled_from(FIELDS), st.sampled_from(FIELDS).map(lambda f: f + ".extra"), st.text(max_size=8)
)


def one_error_line(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli_main(argv)
        except SystemExit as exc:  # argparse's usage errors
            status = exc.code
    return status, err.getvalue()


def assert_rejected_in_one_line(status: int, err: str) -> None:
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err


def check_override(config_path: Path, field: str, text: str) -> None:
    override = f"{field}={text}"
    try:
        config = RunConfig.from_dict(apply_overrides(full_config(), [override]))
    except ConfigError as exc:
        # the error names the field that was set, or the one its value conflicts with
        section = field.split(".")[0]
        assert exc.field.split(".")[0] in (section, "--set") or exc.field in str(exc), (override, exc)
        assert_rejected_in_one_line(
            *one_error_line(["train", "--config", str(config_path), "--set", override])
        )
        return
    except MoekitError:
        assert_rejected_in_one_line(
            *one_error_line(["train", "--config", str(config_path), "--set", override])
        )
        return
    # accepted: a usable config, every number finite, and it is written to checkpoints as JSON
    config.model_config(256)
    encoded = json.dumps(config.to_dict(), allow_nan=False)
    assert RunConfig.from_dict(json.loads(encoded)).to_dict() == config.to_dict()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_text(yaml.safe_dump(full_config(str(path.parent / "run"))))
    return path


@given(field=fields, text=override_text)
@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_field_with_wrong_values_is_rejected_by_name(config_file, field, text):
    check_override(config_file, field, text)


@pytest.mark.slow
@given(field=fields, text=override_text)
@settings(max_examples=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_field_with_wrong_values_is_rejected_by_name_long(config_file, field, text):
    check_override(config_file, field, text)


def test_every_numeric_field_rejects_strings_nan_and_infinity(config_file):
    """Not left to chance: each number of the schema given a string, NaN and infinity."""
    numeric = [
        f
        for f in FIELDS
        if isinstance(_get(full_config(), f), (int, float)) and not isinstance(_get(full_config(), f), bool)
    ]
    assert len(numeric) > 30
    for field in numeric:
        for text in ("fast", ".nan", ".inf", "[1, 2]"):
            with pytest.raises(ConfigError) as info:
                RunConfig.from_dict(apply_overrides(full_config(), [f"{field}={text}"]))
            assert field.split(".")[-1] in str(info.value), (field, text, info.value)


def _get(node, field):
    for part in field.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# -- files and paths ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished two-step run with its checkpoint (trained through the CLI)."""
    root = tmp_path_factory.mktemp("run")
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(full_config(str(root / "out"))))
    status, err = one_error_line(["train", "--config", str(path)])
    assert status == 0, err
    return root


def digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_files_that_are_not_configs(tmp_path):
    cases = {
        "unclosed.yaml": "model: [unclosed\n",
        "list.yaml": "- a\n- b\n",
        "binary.yaml": "\x00\x01\x02",
        "tabs.yaml": "model:\n\t hidden_size: 3\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        status, err = one_error_line(["train", "--config", str(path)])
        assert_rejected_in_one_line(status, err)
        assert name in err
    assert_rejected_in_one_line(*one_error_line(["train", "--config", str(tmp_path)]))
    assert_rejected_in_one_line(*one_error_line(["train", "--config", str(tmp_path / "missing.yaml")]))


def test_unknown_options_and_bad_option_values(tmp_path):
    for argv in (
        ["train", "--config", "x.yaml", "--bogus"],
        ["frobnicate"],
        ["eval", str(tmp_path), "--batches", "many"],
        ["eval", str(tmp_path), "--split", "train"],
    ):
        assert_rejected_in_one_line(*one_error_line(argv))


def test_missing_files_and_wrong_types_for_the_commands_that_use_models(tmp_path):
    """generate, eval-tasks, compress and upcycle name the missing file or the bad option."""
    missing = tmp_path / "no-such-run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: prune\n")
    cases = [
        (["generate", str(missing), "--prompt", "hi"], "no-such-run"),
        (["eval-tasks", str(missing)], "no-such-run"),
        (["eval-tasks", str(tmp_path), "--limit", "x"], "--limit"),
        (["compress", str(missing), "--recipe", str(recipe), "--out", str(tmp_path / "o")], "no-such-run"),
        (
            [
                "compress",
                str(tmp_path),
                "--recipe",
                str(tmp_path / "none.yaml"),
                "--out",
                str(tmp_path / "o"),
            ],
            "none.yaml",
        ),
        (
            ["upcycle", str(missing), "--out", str(tmp_path / "u"), "--experts", "4", "--top-k", "2"],
            "no-such-run",
        ),
    ]
    for argv, named in cases:
        status, err = one_error_line(argv)
        assert_rejected_in_one_line(status, err)
        assert named in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_unwritable_output_paths_fail_before_any_work(tmp_path, trained_run):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = full_config(str(blocker / "run"))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    status, err = one_error_line(["train", "--config", str(path)])
    assert_rejected_in_one_line(status, err)
    assert "out_dir" in err and "a-file" in err
    assert_rejected_in_one_line(*one_error_line(["demo", "--out", str(blocker / "demo")]))
    assert_rejected_in_one_line(*one_error_line(["analyze", str(trained_run / "out"), "--out", str(blocker)]))
    assert blocker.read_text() == "not a directory"


def test_missing_optional_dependency_fails_before_training(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a),
    )
    status, err = one_error_line(["demo", "--out", str(tmp_path / "demo"), "--steps", "1"])
    assert_rejected_in_one_line(status, err)
    assert "matplotlib" in err and "moekit[report]" in err
    assert not (tmp_path / "demo").exists() or not any((tmp_path / "demo").iterdir())
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "transformers" else real_find_spec(name, *a),
    )
    for argv in (
        ["convert", "from-hf", str(tmp_path), str(tmp_path / "out")],
        ["bench", "hf", "--json", str(tmp_path / "bench.json")],
    ):
        status, err = one_error_line(argv)
        assert_rejected_in_one_line(status, err)
        assert "transformers" in err and "moekit[hf]" in err


def test_demo_writes_its_metrics_before_the_report(tmp_path, monkeypatch):
    """A report that fails after the training leaves the training's results on disk."""
    import moekit.demo_report
    from moekit.demo import DemoSettings, run_demo

    def failing_report(*args, **kwargs):
        raise MoekitError("simulated report failure")

    monkeypatch.setattr(moekit.demo_report, "analyse_and_report", failing_report)
    settings = DemoSettings(out_dir=tmp_path, source="sample", steps=1, eval_batches=1, progress=False)
    with pytest.raises(MoekitError, match="simulated"):
        run_demo(settings, log=lambda _: None)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"dense", "moe", "comparison"} <= set(metrics)
    assert all(math.isfinite(metrics[name]["val_loss"]["mean"]) for name in ("dense", "moe"))


def damaged_copy(run: Path, tmp_path: Path, damage) -> Path:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run / "out", copy)
    damage(resolve_checkpoint(copy))
    return copy


def truncate(directory: Path) -> None:
    data = (directory / MODEL_FILE).read_bytes()
    (directory / MODEL_FILE).write_bytes(data[: len(data) // 2])


def flip_a_weight(directory: Path) -> None:
    data = bytearray((directory / OPTIMIZER_FILE).read_bytes())
    data[-3] ^= 0x40  # inside the last tensor: still a readable safetensors file
    (directory / OPTIMIZER_FILE).write_bytes(bytes(data))


def drop_the_header(directory: Path) -> None:
    (directory / MODEL_FILE).write_bytes(b"\xff" * 64)


def bad_state(directory: Path) -> None:
    (directory / STATE_FILE).write_text("{ not json")


@pytest.mark.parametrize("damage", [truncate, flip_a_weight, drop_the_header, bad_state])
def test_damaged_checkpoints_are_refused_and_left_as_they_are(tmp_path, trained_run, damage):
    copy = damaged_copy(trained_run, tmp_path, damage)
    before = digests(copy)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(full_config(str(copy))))
    for argv in (["eval", str(copy)], ["train", "--config", str(config), "--resume"]):
        status, err = one_error_line(argv)
        assert_rejected_in_one_line(status, err)
        assert str(copy) in err
    assert digests(copy) == before


def test_checkpoint_of_another_config_is_refused(tmp_path, trained_run):
    before = digests(trained_run / "out")
    other = full_config(str(tmp_path / "other"))
    other["model"]["hidden_size"] = 64
    other["model"]["moe"]["hidden_size"] = 64
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    status, err = one_error_line(["train", "--config", str(path), "--resume", str(trained_run / "out")])
    assert_rejected_in_one_line(status, err)
    assert "another model config" in err and "hidden_size" in err
    assert digests(trained_run / "out") == before


def test_edited_weights_pass_nothing_silently(tmp_path, trained_run):
    """A checkpoint whose weights were edited after it was written is refused by its checksum,
    even though the file itself is well formed."""
    from safetensors.torch import load_file, save_file

    def edit(directory: Path) -> None:
        tensors = load_file(str(directory / MODEL_FILE))
        name = next(iter(tensors))
        tensors[name] = tensors[name] + 1
        save_file(tensors, str(directory / MODEL_FILE))

    copy = damaged_copy(trained_run, tmp_path, edit)
    status, err = one_error_line(["eval", str(copy)])
    assert_rejected_in_one_line(status, err)
    assert "SHA-256" in err and MODEL_FILE in err
