"""Output locations are checked before any work (`moekit.preflight`): an output under a regular file,
in a place that cannot be written, a file where a folder goes or a folder where a file goes is one
line on stderr naming the option and the path, exit status 2, no traceback, and nothing is created
on disk (the check itself makes no directory). `moekit bench` / `moekit data` without their
sub-command are usage errors naming the choices."""

import json
import os
from pathlib import Path

import pytest
import torch

from moekit.cli import build_parser, main
from moekit.errors import MoekitError
from moekit.layer import MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.preflight import check_command, require_writable_dir, require_writable_file
from moekit.routing.spec import preset
from moekit.train.checkpoint import save_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATA = {"source": "sample", "tokenizer": "byte", "seq_len": 16}
PROC = Path("/proc")  # a directory no file can be created in, even by root
needs_proc = pytest.mark.skipif(not PROC.is_dir(), reason="no /proc on this system")


def _save_run(root: Path, moe: bool) -> Path:
    torch.manual_seed(0)
    moe_config = MoEConfig(hidden_size=16, ff_size=16, router=preset("qwen3_moe", 4, 2)) if moe else None
    config = LMConfig(
        vocab_size=259, hidden_size=16, num_layers=1, num_heads=2, ff_size=32, max_seq_len=32, moe=moe_config
    )
    state = {"config": {"model": config.to_dict(), "data": DATA}, "step": 0}
    save_checkpoint(root / "checkpoints" / "step-0", LanguageModel(config), None, state)
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny inputs, outside each test's tmp_path: a dense and an MoE moekit run and a branches folder."""
    root = tmp_path_factory.mktemp("inputs")
    dense = _save_run(root / "dense", moe=False)
    branches = root / "branches"
    for domain in ("code", "math"):
        _save_run(branches / domain, moe=False)
    manifest = {
        "format": "moekit-branches",
        "version": 1,
        "seed": str(dense),
        "source": "sample",
        "tokenizer": "byte",
        "seq_len": 16,
        "parts": "all",
        "domains": ["code", "math"],
        "runs": {"code": "code", "math": "math"},
    }
    (branches / "branches.json").write_text(json.dumps(manifest))
    return {"dense": dense, "moe": _save_run(root / "moe", moe=True), "branches": branches}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    return status, capsys.readouterr().err


def _assert_refused(argv, capsys, root: Path, *named: str) -> str:
    """`argv` exits 2 with one `moekit: error:` line naming each of `named`, creating nothing in `root`."""
    before = _tree(root)
    status, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert status == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("moekit: error: "), err
    assert "Traceback" not in err
    for needle in named:
        assert needle in lines[0], (needle, lines[0])
    assert _tree(root) == before, "a refused run left something on disk"
    return lines[0]


def _commands(inputs, out: Path) -> dict[str, tuple[list, str]]:
    """Each command whose output folder is `out`, with the name of its output option."""
    recipe = CONFIGS / "compress" / "prune-reap.yaml"
    return {
        "data build --out": (["data", "build", "--source", "sample", "--offline", "--out", out], "--out"),
        "upcycle": (["upcycle", inputs["dense"], "--experts", "2", "--top-k", "1", "--out", out], "--out"),
        "compress": (["compress", inputs["moe"], "--recipe", recipe, "--out", out], "--out"),
        "merge": (["merge", "--method", "ta", inputs["moe"], inputs["moe"], "--out", out], "--out"),
        "branch": (["branch", inputs["dense"], out, "--domains", "code", "--steps", "1"], "OUT"),
        "mix": (["mix", inputs["branches"], out], "OUT"),
    }


COMMANDS = ["data build --out", "upcycle", "compress", "merge", "branch", "mix"]


@pytest.mark.parametrize("command", COMMANDS)
def test_output_folder_under_a_regular_file_is_refused_before_any_work(command, inputs, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    argv, option = _commands(inputs, blocker / "out")[command]
    line = _assert_refused(argv, capsys, tmp_path, option, str(blocker))
    assert "not a directory" in line
    assert blocker.read_text() == "keep me"


@needs_proc
@pytest.mark.parametrize("command", COMMANDS)
def test_output_folder_in_an_unwritable_place_is_refused_before_any_work(command, inputs, tmp_path, capsys):
    out = PROC / "moekit-preflight-test"
    argv, option = _commands(inputs, out)[command]
    line = _assert_refused(argv, capsys, tmp_path, option, str(out))
    assert "not writable" in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["branch", "data build --out"])
def test_output_folder_that_is_a_regular_file_is_refused_and_kept(command, inputs, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    argv, option = _commands(inputs, blocker)[command]
    line = _assert_refused(argv, capsys, tmp_path, option, str(blocker))
    assert "exists and is not a directory" in line
    assert blocker.read_text() == "keep me"


def test_data_build_cache_dir_is_checked(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    corpus = tmp_path / "corpus"
    base = ["data", "build", "--source", "sample", "--offline"]
    _assert_refused(
        [*base, "--cache-dir", blocker / "cache", "--out", corpus], capsys, tmp_path, "--cache-dir"
    )
    _assert_refused([*base, "--cache-dir", blocker / "cache"], capsys, tmp_path, "--cache-dir", str(blocker))
    # no --cache-dir: the corpus goes to <$MOEKIT_DATA_CACHE>/<source>
    monkeypatch.setenv("MOEKIT_DATA_CACHE", str(blocker / "cache"))
    _assert_refused(base, capsys, tmp_path, "MOEKIT_DATA_CACHE", str(blocker))
    assert blocker.read_text() == "keep me" and not corpus.exists()


def _json_commands(inputs, path: Path) -> dict[str, list]:
    moe = inputs["moe"]
    return {
        "generate": ["generate", moe, "--prompt", "ab", "--max-new-tokens", "1", "--quiet", "--json", path],
        "eval-tasks": ["eval-tasks", moe, "--limit", "1", "--max-new-tokens", "1", "--json", path],
    }


@pytest.mark.parametrize("command", ["generate", "eval-tasks"])
def test_json_output_problems_are_refused_before_any_work(command, inputs, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    line = _assert_refused(_json_commands(inputs, folder)[command], capsys, tmp_path, "--json", str(folder))
    assert "is a directory" in line
    under = blocker / "out.json"
    _assert_refused(_json_commands(inputs, under)[command], capsys, tmp_path, "--json", str(blocker))
    if PROC.is_dir():
        out = PROC / "moekit-preflight-test.json"
        _assert_refused(_json_commands(inputs, out)[command], capsys, tmp_path, "--json", str(out))
    assert blocker.read_text() == "keep me" and list(folder.iterdir()) == []


def test_checks_create_nothing(tmp_path):
    """The writability probe leaves no directory (nor its scratch entry) behind."""
    (tmp_path / "existing").mkdir()
    (tmp_path / "report.json").write_text("{}")
    before = _tree(tmp_path)
    require_writable_dir(tmp_path / "new" / "deeper" / "out", "--out")
    require_writable_dir(tmp_path / "existing", "--out")
    require_writable_dir(tmp_path / "existing" / "new", "--out")
    require_writable_file(tmp_path / "new" / "result.json", "--json")
    require_writable_file(tmp_path / "report.json", "--json")  # an existing file is replaced, fine
    assert _tree(tmp_path) == before
    with pytest.raises(MoekitError, match="a file, not a directory"):
        require_writable_dir(tmp_path / "report.json" / "x" / "y", "--out")


def test_a_run_refused_after_the_output_check_leaves_no_output_folder(inputs, tmp_path, capsys):
    """demo, analyze and convert check their output first; a later refusal leaves no empty folder."""
    cases = [
        (["demo", "--out", tmp_path / "demo" / "out", "--steps", "0"], "--steps"),
        (["analyze", inputs["moe"], "--out", tmp_path / "analysis" / "out", "--batches", "0"], "batches"),
        (
            ["convert", "to-hf", inputs["moe"], tmp_path / "hf" / "deep" / "dst", "--layout", "packed"],
            "--layout",
        ),
    ]
    for argv, named in cases:
        _assert_refused(argv, capsys, tmp_path, named)
    assert list(tmp_path.iterdir()) == []


def test_commands_still_make_their_output_folder(tmp_path, capsys):
    out = tmp_path / "not" / "yet" / "corpus"
    status, err = _run(["data", "build", "--source", "sample", "--offline", "--out", out], capsys)
    assert status == 0, err
    assert out.is_dir() and any(out.iterdir())


@pytest.mark.parametrize(("command", "choices"), [("bench", "layer, hf"), ("data", "build")])
def test_a_command_without_its_sub_command_is_a_usage_error(command, choices, capsys):
    status, err = _run([command], capsys)
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and f"moekit {command}: error:" in lines[0] and choices in lines[0], err


def test_check_command_takes_the_parsers_namespace(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = build_parser().parse_args(["mix", str(tmp_path / "src"), str(blocker / "out")])
    with pytest.raises(MoekitError, match="OUT"):
        check_command(args)
    args = build_parser().parse_args(
        ["generate", str(tmp_path / "src"), "--prompt", "x", "--json", str(tmp_path)]
    )
    with pytest.raises(MoekitError, match="--json"):
        check_command(args)
    assert os.listdir(tmp_path) == ["a-file"]
