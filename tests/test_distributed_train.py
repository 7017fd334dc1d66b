"""The trainer under expert parallelism: short float64 runs on the shipped sample corpus at EP 2
(W=2), EP 2 x DP 2 and EP 4 (W=4), and pure DP (W=2), end with the weights, losses and gradient
norms of the single-process run over the same global batch (4 micro-batches per step); a
checkpoint saved at EP 2 resumes at EP 4 and at EP 1 and ends where the straight run ends; and the
real launcher (`torchrun ... -m moekit train --set parallel.ep=2`) trains and writes a checkpoint
a single process loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from moekit.data.lmdata import prepare_data
from moekit.distributed import full_model_tensors, run_local
from moekit.errors import ConfigError
from moekit.models.lm import LanguageModel, LMConfig
from moekit.train.checkpoint import load_checkpoint, read_checkpoint_state
from moekit.train.config import RunConfig
from moekit.train.metrics import read_metrics
from moekit.train.trainer import Trainer

RTOL = 1e-9
STEPS = 3
GLOBAL_MICRO_BATCHES = 4
TIMEOUT_S = 240


def run_config(out_dir: Path, ep: int = 1, grad_accum: int = GLOBAL_MICRO_BATCHES) -> dict:
    return {
        "name": "ep",
        "out_dir": str(out_dir),
        "model": {
            "vocab_size": "auto",
            "hidden_size": 16,
            "num_layers": 2,
            "num_heads": 2,
            "ff_size": 32,
            "max_seq_len": 16,
            "moe": {
                "ff_size": 8,
                "router": {"preset": "deepseek_v3", "num_experts": 8, "top_k": 2, "num_groups": 2},
                "num_shared_experts": 1,
            },
        },
        "data": {"source": "sample", "seq_len": 16},
        "train": {
            "steps": STEPS,
            "micro_batch_size": 2,
            "grad_accum": grad_accum,
            "warmup_steps": 1,
            "clip_grad_norm": 0.5,
        },
        "loop": {"log_every": 1, "eval_batches": 1, "progress": False},
        "balance": {
            "objectives": [
                {"kind": "load_balance", "scope": "global", "coefficient": 0.01},
                {"kind": "z_loss", "scope": "global", "coefficient": 0.001},
            ],
            "bias_update_rate": 0.01,
        },
        "parallel": {"ep": ep},
    }


@dataclass(frozen=True)
class Job:
    """One training run on every rank of a spawned world."""

    name: str
    ep: int
    out_dir: str
    max_steps: int | None = None
    resume: str | None = None


def silent(message: str) -> None:
    pass


def train(config: dict, data, resume: str | None = None, max_steps: int | None = None) -> Trainer:
    trainer = Trainer(RunConfig.from_dict(config), data=data, log=silent, dtype=torch.float64)
    if resume is not None:
        trainer.resume(Path(resume))
    trainer.run(max_steps=max_steps)
    return trainer


def _worker(rank: int, world_size: int, jobs: list[Job]) -> dict:
    data = prepare_data("sample", log=silent)
    grad_accum = GLOBAL_MICRO_BATCHES // world_size
    out = {}
    for job in jobs:
        config = run_config(Path(job.out_dir), job.ep, grad_accum)
        trainer = train(config, data, job.resume, job.max_steps)
        out[job.name] = {"tensors": full_model_tensors(trainer.model, trainer.mesh), "step": trainer.step}
    return out


@pytest.fixture(scope="module")
def data():
    return prepare_data("sample", log=silent)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("ep-train")


@pytest.fixture(scope="module")
def reference(runs, data) -> Trainer:
    """One process, 4 accumulated micro-batches per step."""
    return train(run_config(runs / "single"), data)


@pytest.fixture(scope="module")
def world2(runs) -> list[dict]:
    jobs = [
        Job("ep2", 2, str(runs / "ep2")),
        Job("dp2", 1, str(runs / "dp2")),
        Job("ep2_first_steps", 2, str(runs / "ep2_partial"), max_steps=2),
    ]
    return run_local(_worker, 2, (jobs,), timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def world4(runs, world2) -> list[dict]:
    jobs = [
        Job("ep2xdp2", 2, str(runs / "ep2xdp2")),
        Job("ep4_resumed", 4, str(runs / "ep4_resumed"), resume=str(runs / "ep2_partial")),
    ]
    return run_local(_worker, 4, (jobs,), timeout_s=TIMEOUT_S)


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), what
    for name, want in expected.items():
        assert got[name].shape == want.shape, f"{what}: {name}"
        if name.endswith("selection_bias"):
            assert torch.equal(got[name], want), f"{what}: {name}"
            continue
        error = float((got[name] - want).norm()) / float(want.norm())
        assert error <= RTOL, f"{what}: {name} relative error {error:.3g}"


def assert_same_metrics(run_dir: Path, reference_dir: Path, what: str) -> None:
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    expected = [r for r in read_metrics(reference_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), f"{what}: written once, by rank 0"
    for got, want in zip(records, expected, strict=True):
        assert got["tokens"] == want["tokens"], what
        for key in ("train/loss", "train/lm_loss", "train/load_balance/global", "grad_norm"):
            assert abs(got[key] - want[key]) <= RTOL * abs(want[key]), f"{what}: step {got['step']} {key}"


@pytest.mark.distributed
@pytest.mark.parametrize("run", ["ep2", "dp2", "ep2xdp2"])
def test_training_ends_with_the_single_process_weights(run, world2, world4, reference, runs):
    ranks = world2 if run in ("ep2", "dp2") else world4
    expected = {k: v.detach() for k, v in full_model_tensors(reference.model, reference.mesh).items()}
    for rank, results in enumerate(ranks):
        assert results[run]["step"] == STEPS
        assert_same_weights(results[run]["tensors"], expected, f"{run} rank {rank}")
        # replicated weights stay bit-identical on every rank
        for name, tensor in results[run]["tensors"].items():
            assert torch.equal(tensor, ranks[0][run]["tensors"][name]), f"{run} rank {rank}: {name}"
    assert_same_metrics(runs / run, runs / "single", run)


def test_reference_run_clips_and_moves_the_bias(reference, runs):
    norms = [r["grad_norm"] for r in read_metrics(runs / "single" / "metrics.jsonl") if "grad_norm" in r]
    assert min(norms) > 0.5  # clip_grad_norm is active at every step
    bias = [t for n, t in reference.model.named_buffers() if n.endswith("selection_bias")]
    assert bias and all(torch.count_nonzero(b) > 0 for b in bias)


@pytest.mark.distributed
def test_a_checkpoint_saved_at_ep2_resumes_at_ep4_and_ep1(world2, world4, reference, runs, data):
    """The EP 2 run stopped after 2 steps; EP 4 (W=4) and one process each finish the run from
    its checkpoint and end with the straight run's weights (optimizer state and data position
    included)."""
    expected = full_model_tensors(reference.model, reference.mesh)
    state = read_checkpoint_state(runs / "ep2_partial")
    assert state["step"] == 2 and state["config"]["parallel"] == {"ep": 2}
    for rank, results in enumerate(world4):
        assert_same_weights(results["ep4_resumed"]["tensors"], expected, f"EP 4 resumed, rank {rank}")
    single = train(run_config(runs / "ep1_resumed"), data, resume=str(runs / "ep2_partial"))
    assert single.step == STEPS
    assert_same_weights(full_model_tensors(single.model, single.mesh), expected, "EP 1 resumed")


def test_parallel_config_errors_name_the_field(runs):
    config = run_config(runs / "bad", ep=3)
    with pytest.raises(ConfigError, match=r"parallel\.ep.*num_experts=8"):
        RunConfig.from_dict(config)
    config["parallel"] = {"ep": 0}
    with pytest.raises(ConfigError, match=r"parallel\.ep"):
        RunConfig.from_dict(config)
    config["parallel"] = {"ep": 2}
    with pytest.raises(ConfigError, match=r"parallel\.ep.*torchrun"):
        Trainer(RunConfig.from_dict(config), log=silent)  # one process cannot hold EP 2


@pytest.mark.distributed
def test_torchrun_launcher(tmp_path):
    """`torchrun --nproc_per_node 2 -m moekit train --config ... --set parallel.ep=2`: one summary,
    one metrics stream, and a checkpoint that a single process loads."""
    config = run_config(tmp_path / "run", ep=1, grad_accum=1)
    config["train"]["steps"] = 2
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")
    }
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *("-m", "moekit", "train", "--config", str(path), "--set", "parallel.ep=2"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"out_dir"') == 1  # rank 0 alone prints the summary
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["steps"] == 2
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    state = read_checkpoint_state(tmp_path / "run")
    assert state["config"]["parallel"] == {"ep": 2}
    model = LanguageModel(LMConfig.from_dict(state["config"]["model"]))
    load_checkpoint(tmp_path / "run", model, restore_rng=False)
    assert model.moe_layers[0].experts.w_in.shape[0] == 8  # the full experts, in the plain format
