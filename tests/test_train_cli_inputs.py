"""`moekit train` and `moekit eval` on bad input: an out_dir that already holds a run is refused
(unless --resume continues it or --overwrite replaces it, whole), and `eval --batches` must count."""

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from moekit.cli import main as cli_main

pytestmark = pytest.mark.production_threads

CONFIG = {
    "name": "inputs",
    "model": {
        "vocab_size": "auto",
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "ff_size": 64,
        "max_seq_len": 32,
        "moe": {"ff_size": 16, "router": {"preset": "qwen3_moe", "num_experts": 4, "top_k": 2}},
    },
    "data": {"source": "sample", "seq_len": 32},
    "train": {"steps": 2, "micro_batch_size": 2, "warmup_steps": 1},
    "loop": {"log_every": 1, "eval_batches": 1, "progress": False},
    "balance": {"objectives": [{"kind": "load_balance", "scope": "global", "coefficient": 0.01}]},
}


def write_config(path: Path, out_dir: Path, **loop) -> Path:
    path.write_text(yaml.safe_dump({**CONFIG, "out_dir": str(out_dir), "loop": {**CONFIG["loop"], **loop}}))
    return path


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli_main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's usage errors
            status = exc.code
    return status, out.getvalue(), err.getvalue()


def one_error_line(status: int, err: str) -> str:
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moekit: error:") and "Traceback" not in err, err
    return lines[0]


def digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def steps_of(out_dir: Path) -> list[str]:
    return sorted(p.name for p in (out_dir / "checkpoints").iterdir() if p.name.startswith("step-"))


def events(out_dir: Path) -> list[str]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["event"] for r in records if "event" in r]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished two-step run, checkpointed at every step, trained into an out_dir that existed
    (empty) beforehand: an empty out_dir holds no run."""
    root = tmp_path_factory.mktemp("finished")
    (root / "out").mkdir()
    status, _, err = cli(
        "train", "--config", write_config(root / "run.yaml", root / "out", checkpoint_every=1)
    )
    assert status == 0, err
    assert steps_of(root / "out") == ["step-000001", "step-000002"]
    return root


def copy_of(finished_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished_run / "out", tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    return tmp_path / "out"


def test_an_out_dir_holding_a_run_is_refused_before_any_work(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    before = digests(out)
    config = write_config(tmp_path / "run.yaml", out)
    line = one_error_line(*cli("train", "--config", config, "--set", "train.lr=0.01")[::2])
    assert str(out) in line and "out_dir" in line and "--resume" in line and "--overwrite" in line
    assert digests(out) == before
    # each of the run's traces is enough: the metrics alone (killed before its first checkpoint) ...
    shutil.rmtree(out / "checkpoints")
    one_error_line(*cli("train", "--config", config)[::2])
    # ... or the checkpoints alone
    (out / "metrics.jsonl").unlink()
    shutil.copytree(finished_run / "out" / "checkpoints", out / "checkpoints")
    one_error_line(*cli("train", "--config", config)[::2])
    # a folder with other files and an empty checkpoints/ holds no run
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").mkdir()
    status, _, err = cli("train", "--config", config)
    assert status == 0, err
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_resume_continues_the_run_in_out_dir(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    config = write_config(tmp_path / "run.yaml", out, checkpoint_every=1)
    status, _, err = cli("train", "--config", config, "--resume", "--set", "train.steps=3")
    assert status == 0, err
    assert steps_of(out) == ["step-000001", "step-000002", "step-000003"]
    assert events(out) == ["start", "resume"]


def test_overwrite_replaces_the_run_whole(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    config = write_config(tmp_path / "run.yaml", out)  # no checkpoint_every: only the final one
    status, stdout, err = cli("train", "--config", config, "--overwrite", "--set", "train.steps=1")
    assert status == 0, err
    assert json.loads(stdout[stdout.index("{") :])["steps"] == 1
    # the new run's checkpoint alone, not beside the old run's steps 1 and 2; one start event
    assert steps_of(out) == ["step-000001"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000001"
    assert events(out) == ["start"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 1
    # the rest of the folder is the user's; nothing of the removal is left behind
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "notes.txt"]


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    before = digests(out)
    config = write_config(tmp_path / "run.yaml", out)
    for bad in ("train.lr=-1", f"data.source={tmp_path / 'no-such-corpus'}"):
        line = one_error_line(*cli("train", "--config", config, "--overwrite", "--set", bad)[::2])
        assert bad.split("=")[0] in line or "no-such-corpus" in line, line
        assert digests(out) == before


def test_overwrite_and_resume_exclude_each_other(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    before = digests(out)
    config = write_config(tmp_path / "run.yaml", out)
    line = one_error_line(*cli("train", "--config", config, "--overwrite", "--resume")[::2])
    assert "--overwrite" in line and "--resume" in line
    assert digests(out) == before


def test_overwrite_refuses_to_start_from_a_checkpoint_it_would_remove(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    before = digests(out)
    config = write_config(tmp_path / "run.yaml", out)
    start = out / "checkpoints" / "step-000002"
    line = one_error_line(
        *cli("train", "--config", config, "--overwrite", "--set", f"model.init_from={start}")[::2]
    )
    assert "model.init_from" in line and str(out) in line
    assert digests(out) == before


def test_eval_batches_must_not_be_negative(finished_run):
    for batches in ("-1", "-5"):
        line = one_error_line(*cli("eval", finished_run / "out", "--batches", batches)[::2])
        assert "--batches" in line and batches in line
    status, stdout, err = cli("eval", finished_run / "out", "--batches", "0")  # 0: every batch
    assert status == 0, err
    losses = json.loads(stdout)["loss"]
    assert losses and "mean" in losses
