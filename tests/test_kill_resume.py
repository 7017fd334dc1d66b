"""`moekit train` in subprocesses: two processes train to the same bits, and a run killed with
SIGKILL at random moments (one of them inside a checkpoint write) and resumed each time ends with
the weights, optimizer state and metrics of an uninterrupted run, never losing its last checkpoint."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moekit.io import load_tensors
from moekit.train.checkpoint import MODEL_FILE, OPTIMIZER_FILE, load_checkpoint, resolve_checkpoint

pytestmark = pytest.mark.production_threads

STEPS = 16  # room past the first kill: on a fast machine a step of this model takes milliseconds
CHECKPOINT_EVERY = 2
# Fields of a metrics record that measure time, not the computation.
TIMING_FIELDS = {"tokens_per_s", "step_s"}

CONFIG = {
    "name": "kill",
    "model": {
        "vocab_size": "auto",
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "ff_size": 64,
        "max_seq_len": 32,
        "moe": {"ff_size": 32, "router": {"preset": "qwen3_moe", "num_experts": 8, "top_k": 2}},
    },
    "data": {"source": "sample", "seq_len": 32},
    "train": {"steps": STEPS, "micro_batch_size": 8, "warmup_steps": 2},
    "loop": {"log_every": 1, "eval_batches": 1, "checkpoint_every": CHECKPOINT_EVERY, "progress": False},
    "balance": {
        "objectives": [{"kind": "load_balance", "scope": "global", "coefficient": 0.01}],
        "bias_update_rate": 0.01,
    },
}

# `moekit train`, killing itself (SIGKILL) inside the checkpoint write of KILL_IN_CHECKPOINT:
# after the tensor files are written and before state.json is.
DYING_IN_CHECKPOINT = """
import os, signal, sys
from moekit.runtime import keep_freed_memory, tune_cpu_runtime
tune_cpu_runtime()
import moekit.train.checkpoint as checkpoint
target = "." + os.environ["KILL_IN_CHECKPOINT"] + "."
real_write_json = checkpoint.write_json_atomic
def write_json_then_die(path, data):
    if path.parent.name.startswith(target):
        os.kill(os.getpid(), signal.SIGKILL)
    real_write_json(path, data)
checkpoint.write_json_atomic = write_json_then_die
from moekit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_command(config: Path, resume: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "moekit",
        "train",
        "--config",
        str(config),
        *(["--resume"] if resume else []),
    ]


def write_config(path: Path, out_dir: Path) -> Path:
    path.write_text(yaml.safe_dump({**CONFIG, "out_dir": str(out_dir)}))
    return path


def progress(out_dir: Path) -> tuple[int, int]:
    """(start and resume events in metrics.jsonl, the last step logged after the last of them)."""
    path = out_dir / "metrics.jsonl"
    events, step = 0, 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if "event" in record:
                events, step = events + 1, record["step"]
            else:
                step = max(step, record["step"])
    return events, step


def kill_after_step(process: subprocess.Popen, out_dir: Path, step: int, delay: float) -> None:
    """SIGKILL `process` `delay` seconds after this attempt (its start or resume event) has logged `step`."""
    # a guard against a hung run, not a timing check: a loaded machine may need minutes to import
    # torch and build the native kernel in a fresh process
    deadline = time.monotonic() + 600
    events = progress(out_dir)[0] + 1
    while progress(out_dir) < (events, step):
        assert process.poll() is None, f"the run ended before step {step}: {process.stderr.read()}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()


def training_records(out_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records if "event" not in r]


def assert_same_final_state(a: Path, b: Path) -> None:
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        ours, theirs = (load_tensors(resolve_checkpoint(d) / name) for d in (a, b))
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].equal(theirs[key]), f"{name}: {key}"


def assert_last_checkpoint_loads(out_dir: Path, model) -> int:
    """The run's newest checkpoint exists, passes its checksums and loads; returns its step."""
    state = load_checkpoint(out_dir, model, restore_rng=False)
    return state["step"]


@pytest.mark.parametrize(
    "seed,later_kills",
    [(19, 0), pytest.param(7, 1, marks=pytest.mark.slow), pytest.param(3, 2, marks=pytest.mark.slow)],
)
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, seed, later_kills):
    """Kills: one at a random step of the first attempt, one inside a checkpoint write, and
    `later_kills` more at random moments of resumed attempts."""
    from moekit.models.lm import LanguageModel, LMConfig

    rng = random.Random(seed)
    env = {**os.environ, "MOEKIT_CACHE_DIR": str(tmp_path / "kernel-cache")}  # measured afresh here
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight_config = write_config(tmp_path / "straight.yaml", straight_dir)
    killed_config = write_config(tmp_path / "killed.yaml", killed_dir)

    # The uninterrupted run and the first attempt start together: both measure the GEMM kernel
    # choice for this (empty) cache, under load from each other; they must still agree.
    straight = subprocess.Popen(
        train_command(straight_config, False),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    attempt = subprocess.Popen(
        train_command(killed_config, False),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    kill_after_step(attempt, killed_dir, step=rng.randint(3, 4), delay=rng.uniform(0, 0.05))
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    model = LanguageModel(
        LMConfig.from_dict(
            json.loads((resolve_checkpoint(straight_dir) / "state.json").read_text())["config"]["model"]
        )
    )
    steps_seen = [assert_last_checkpoint_loads(killed_dir, model)]

    # Second attempt: resumes, then dies inside the write of a checkpoint after the one it resumed
    # from (the first attempt may have run a few steps past its kill point before the signal landed).
    dying_at = max(3 * CHECKPOINT_EVERY, steps_seen[0] + CHECKPOINT_EVERY)
    assert dying_at < STEPS, f"the first attempt ran to step {steps_seen[0]} before its kill"
    dying = subprocess.run(
        [sys.executable, "-c", DYING_IN_CHECKPOINT, "train", "--config", str(killed_config), "--resume"],
        env={**env, "KILL_IN_CHECKPOINT": f"step-{dying_at:06d}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dying.returncode == -signal.SIGKILL, dying.stderr
    leftovers = [p.name for p in (killed_dir / "checkpoints").iterdir() if p.name.startswith(".step-")]
    assert leftovers, "the kill did not happen inside a checkpoint write"
    steps_seen.append(assert_last_checkpoint_loads(killed_dir, model))
    assert steps_seen[-1] == dying_at - CHECKPOINT_EVERY  # the last good one, not the half-written one

    # Further attempts: each resumes and is killed at a random moment after its first step.
    for _ in range(later_kills):
        resumed_at = steps_seen[-1]
        attempt = subprocess.Popen(
            train_command(killed_config, True),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        kill_after_step(
            attempt,
            killed_dir,
            step=min(STEPS - 1, resumed_at + rng.randint(1, 2)),
            delay=rng.uniform(0, 0.05),
        )
        steps_seen.append(assert_last_checkpoint_loads(killed_dir, model))

    # Last attempt: resumes and finishes.
    final = subprocess.run(
        train_command(killed_config, True), env=env, capture_output=True, text=True, timeout=300
    )
    assert final.returncode == 0, final.stderr
    assert steps_seen == sorted(steps_seen) and steps_seen[0] >= CHECKPOINT_EVERY

    assert_same_final_state(straight_dir, killed_dir)
    ours, theirs = training_records(straight_dir), training_records(killed_dir)
    assert ours == theirs  # every loss, norm and learning rate to the bit, each step once
    assert [r["step"] for r in theirs if "train/lm_loss" in r] == list(range(1, STEPS + 1))
    assert not [p for p in (killed_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    events = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in events if "event" in r]
    assert events[0]["event"] == "start" and all(e["event"] == "resume" for e in events[1:])
    assert all(e["kernels"]["gemm"] == events[0]["kernels"]["gemm"] for e in events)


def test_stale_writes_of_a_killed_checkpoint_are_removed_and_the_last_good_copy_kept(tmp_path):
    """What a kill can leave mid-write: a temporary checkpoint directory, the temporary file of the
    `latest` pointer's atomic write, and a `.old` copy whose replacement never arrived."""
    from moekit.train.checkpoint import remove_stale_writes

    (tmp_path / ".step-000006.abc123").mkdir()
    (tmp_path / ".latest.x1y2z3.tmp").write_text("step-000006")
    (tmp_path / ".step-000004.old").mkdir()
    (tmp_path / "step-000002").mkdir()
    (tmp_path / "latest").write_text("step-000002")
    remove_stale_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000002", "step-000004"]
