"""Expert parallelism on gloo processes of this machine, against the single-process run in float64.

One spawned run per world size (2 and 4 processes) does every check, on meshes EP 2 (W=2), EP 2 x
DP 2, EP 4 and DP 4 (W=4): forward outputs, loss and objectives, the gradient of every parameter
(router included, P2/P11), the aux-loss-free bias update, and the globally clipped gradients (P10)
equal the single-process step to a relative 1e-9; forced routings where every token goes to one
rank's experts, where an expert gets no tokens and where a rank's micro-batch is all padding finish
(P9) and still give the exact gradients, with exact zeros for experts that saw no rows. Each spawned
run has a deadline, so a hang fails the test instead of blocking the suite. The W=4 run also
moves a checkpoint EP 1 -> EP 2 -> EP 4 and back to EP 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moekit.balance import BalanceConfig, accumulate_gradients, apply_bias_updates
from moekit.data.batch import Batch
from moekit.data.lmdata import prepare_data
from moekit.data.tokenizer import ByteTokenizer
from moekit.distributed import (
    build_mesh,
    clip_grad_norm,
    full_gradients,
    full_model_tensors,
    load_checkpoint,
    make_expert_parallel,
    save_checkpoint,
    sync_gradients,
)
from moekit.distributed.checkpoint import full_optimizer_tensors
from moekit.distributed.local import LocalRunError, run_local
from moekit.distributed.mesh import check_ep_size
from moekit.errors import ConfigError
from moekit.io import load_tensors
from moekit.models.lm import LanguageModel, LMConfig
from moekit.train import checkpoint as single_checkpoint
from moekit.train.optim import make_optimizer
from moekit.train.trainer import MicroBatch, lm_forward

RTOL = 1e-9
MAX_NORM = 1e-3  # far below the gradient norm, so clipping always scales
NUM_EXPERTS = 8
TIMEOUT_S = 150  # a hang fails the test instead of blocking the suite

# model variant -> the moe section: DeepSeek-V3 (sigmoid, groups, selection bias, shared expert,
# expert biases) and a Llama-4-style router that applies the weight to the experts' input.
VARIANTS = {
    "deepseek": {
        "ff_size": 6,
        "router": {"preset": "deepseek_v3", "num_experts": NUM_EXPERTS, "top_k": 2, "num_groups": 2},
        "num_shared_experts": 1,
        "expert_bias": True,
    },
    "weight_on_input": {
        "ff_size": 6,
        "router": {"preset": "llama4", "num_experts": NUM_EXPERTS, "top_k": 2},
    },
}
# forced routings (deepseek only): selection-bias offsets per expert
ROUTINGS = {
    "natural": {},
    "one_rank": {0: 10.0, 1: 10.0},  # experts 0 and 1 (group 0) take every token: rank 0's experts
    "empty_expert": {5: -10.0},  # expert 5 is never chosen
}
BALANCE = {
    "objectives": [
        {"kind": "load_balance", "scope": "global", "coefficient": 0.01},
        {"kind": "z_loss", "scope": "global", "coefficient": 0.001},
        {"kind": "load_balance", "scope": "sequence", "coefficient": 0.003},
    ],
    "bias_update_rate": 0.01,
}


@dataclass(frozen=True)
class Case:
    variant: str
    routing: str = "natural"
    empty_rank: bool = False  # the global batch's last micro-batch is all padding

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.routing}" + ("/empty_rank" if self.empty_rank else "")


CASES = (
    Case("deepseek"),
    Case("weight_on_input"),
    Case("deepseek", "one_rank"),
    Case("deepseek", "empty_expert"),
    Case("deepseek", "natural", empty_rank=True),
)
MESHES = {2: (2,), 4: (2, 4, 1)}  # world size -> the EP sizes tested (DP = W / EP)


def build_model(variant: str, routing: str = "natural") -> LanguageModel:
    torch.manual_seed(7)
    config = LMConfig.from_dict(
        {
            "vocab_size": ByteTokenizer().vocab_size,
            "hidden_size": 8,
            "num_layers": 2,
            "num_heads": 2,
            "ff_size": 12,
            "max_seq_len": 8,
            "moe": VARIANTS[variant],
        }
    )
    model = LanguageModel(config).double()
    with torch.no_grad():
        for moe in model.moe_layers:
            experts = moe.experts
            if experts.b_in is not None:
                experts.b_in.normal_(0, 0.1)
                experts.b_out.normal_(0, 0.1)
            bias = moe.router.selection_bias
            if bias is not None:
                bias.normal_(0, 0.001)
                for expert, offset in ROUTINGS[routing].items():
                    bias[expert] += offset
    return model


def empty_like(batch: Batch) -> Batch:
    """The same shape, all padding: no token is routed and no target counts."""
    return Batch(
        input_ids=torch.zeros_like(batch.input_ids),
        targets=torch.full_like(batch.targets, -100),
        token_mask=torch.zeros_like(batch.token_mask),
        doc_ids=torch.full_like(batch.doc_ids, -1),
        positions=torch.zeros_like(batch.positions),
        domains=torch.full_like(batch.domains, -1),
    )


def global_batch(batches: list[Batch], case: Case) -> list[Batch]:
    return [*batches[:-1], empty_like(batches[-1])] if case.empty_rank else list(batches)


@dataclass
class StepResult:
    logits: list[torch.Tensor]  # per micro-batch of this rank (all of them for the reference)
    loss: float
    lm_loss: float
    objectives: dict[str, float]
    grads: dict[str, torch.Tensor]  # full tensors (expert shards gathered)
    norm: float
    clipped: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor]  # every selection bias after the step's update


@torch.no_grad()
def model_logits(model, batch: Batch) -> torch.Tensor:
    return model(batch.input_ids, batch.positions, batch.doc_ids, batch.token_mask).logits.clone()


def run_step(model, micro: list[Batch], mesh=None) -> StepResult:
    """One optimizer step's gradient work as the trainer does it: accumulate over the micro-batches
    (all-reduced normalisers), sync, global clipping, then the bias update."""
    config = BalanceConfig.from_dict(BALANCE)
    group = None if mesh is None else mesh.world_group
    model.zero_grad(set_to_none=True)
    report = accumulate_gradients(
        lambda mb: lm_forward(model, mb.batch), [MicroBatch(b) for b in micro], config, 0, group
    )
    if mesh is None:
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        clipped = {n: p.grad.clone() for n, p in model.named_parameters()}
    else:
        sync_gradients(model, mesh)
        grads = full_gradients(model, mesh)
        norm = float(clip_grad_norm(model, mesh, MAX_NORM))
        clipped = full_gradients(model, mesh)
    apply_bias_updates(model, report.expert_counts, config.bias_update_rate.value(0))
    biases = {n: b.clone() for n, b in model.named_buffers() if n.endswith("selection_bias")}
    logits = [model_logits(model, b) for b in micro]
    return StepResult(logits, report.loss, report.lm_loss, report.objectives, grads, norm, clipped, biases)


def sample_batches(count: int = 4) -> list[Batch]:
    data = prepare_data("sample", log=lambda _: None)
    stream = data.train_batches(2, 8, seed=3, stream="sequential")  # the edge cases below rely on these rows
    return [next(stream) for _ in range(count)]


# --- the spawned side ---------------------------------------------------------------------------


def _worker(rank: int, world_size: int, batches: list[Batch], checkpoint_dir: str | None) -> dict:
    results: dict = {}
    for ep in MESHES[world_size]:
        mesh = build_mesh(ep)
        for case in CASES:
            micro = global_batch(batches, case)[rank::world_size]
            model = build_model(case.variant, case.routing)
            make_expert_parallel(model, mesh)
            results[(ep, case.name)] = run_step(model, micro, mesh)
    try:
        build_mesh(3)
    except ConfigError as exc:
        results["bad_ep"] = str(exc)
    if checkpoint_dir is not None:
        results["checkpoint"] = _move_checkpoint(rank, world_size, batches, Path(checkpoint_dir))
    return results


def _move_checkpoint(rank: int, world_size: int, batches: list[Batch], root: Path) -> dict:
    """Load the single-process checkpoint `ep1` at EP 2, save it as `ep2`, load `ep2` at EP 4."""
    out = {}
    for ep, load_from, save_to in ((2, "ep1", "ep2"), (4, "ep2", None)):
        mesh = build_mesh(ep)
        model = build_model("deepseek", "empty_expert")  # different weights: loading must replace them
        make_expert_parallel(model, mesh)
        optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
        load_checkpoint(root / load_from, model, optimizer)
        out[ep] = {
            "logits": model_logits(model, batches[rank]),
            "tensors": full_model_tensors(model, mesh),
            "optimizer": full_optimizer_tensors(model, optimizer, mesh)[0],
        }
        if save_to is not None:
            save_checkpoint(root / save_to, model, optimizer, {"step": 1}, mesh)
    return out


def spawn(world_size: int, batches: list[Batch], checkpoint_dir: Path | None = None) -> list[dict]:
    directory = None if checkpoint_dir is None else str(checkpoint_dir)
    return run_local(_worker, world_size, (batches, directory), timeout_s=TIMEOUT_S)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batches() -> list[Batch]:
    return sample_batches()


@pytest.fixture(scope="module")
def reference(batches) -> dict[str, StepResult]:
    """The single-process step over the whole global batch (4 accumulated micro-batches)."""
    return {
        case.name: run_step(build_model(case.variant, case.routing), global_batch(batches, case))
        for case in CASES
    }


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory, batches) -> Path:
    """A single-process checkpoint (model + AdamW state after one step) in `ep1`."""
    root = tmp_path_factory.mktemp("ep-checkpoints")
    model = build_model("deepseek")
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    run_step(model, batches)
    optimizer.step()
    single_checkpoint.save_checkpoint(root / "ep1", model, optimizer, {"step": 1})
    return root


@pytest.fixture(scope="module")
def world2(batches) -> list[dict]:
    return spawn(2, batches)


@pytest.fixture(scope="module")
def world4(batches, checkpoint_root) -> list[dict]:
    return spawn(4, batches, checkpoint_root)


# --- checks ---------------------------------------------------------------------------------------


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.norm())
    error = float((got - expected).norm())
    return error / scale if scale else error


def assert_same_step(result: StepResult, expected: StepResult, rank: int, world_size: int, what: str) -> None:
    for got, want in zip(result.logits, expected.logits[rank::world_size], strict=True):
        assert relative_error(got, want) <= RTOL, f"{what}: forward output"
    for name in ("loss", "lm_loss"):
        got, want = getattr(result, name), getattr(expected, name)
        assert abs(got - want) <= RTOL * abs(want), f"{what}: {name} {got!r} != {want!r}"
    assert result.objectives.keys() == expected.objectives.keys()
    for name, want in expected.objectives.items():
        assert abs(result.objectives[name] - want) <= RTOL * abs(want), f"{what}: {name}"
    assert result.grads.keys() == expected.grads.keys()
    for name, want in expected.grads.items():
        assert result.grads[name].shape == want.shape, f"{what}: {name}"
        assert relative_error(result.grads[name], want) <= RTOL, f"{what}: gradient of {name}"
        assert relative_error(result.clipped[name], expected.clipped[name]) <= RTOL, f"{what}: clipped {name}"
    assert abs(result.norm - expected.norm) <= RTOL * expected.norm, f"{what}: global grad norm"
    for name, want in expected.biases.items():
        assert torch.equal(result.biases[name], want), f"{what}: {name} after the bias update"


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_every_mesh_matches_the_single_process_step(world_size, world2, world4, reference):
    """Forward, loss, objectives, every gradient, the global norm, the clipped gradients and the
    bias update: EP 2 (W=2), EP 2 x DP 2, EP 4 and DP 4 (W=4) equal one process with GA=4."""
    ranks = world2 if world_size == 2 else world4
    for rank, results in enumerate(ranks):
        for ep in MESHES[world_size]:
            for case in CASES:
                what = f"W={world_size} EP={ep} rank {rank} {case.name}"
                assert_same_step(results[(ep, case.name)], reference[case.name], rank, world_size, what)


def test_reference_really_exercises_the_edge_cases(reference):
    """The forced routings do what the hang tests need: in `one_rank` only experts 0 and 1 (both on
    EP rank 0 at EP 2 and EP 4) get rows; in `empty_expert` expert 5 gets none; unused experts
    have exactly zero (not missing) gradients, as the EP runs must reproduce exactly."""
    one_rank = reference["deepseek/one_rank"].grads
    empty = reference["deepseek/empty_expert"].grads
    for name in ("blocks.0.ffn.experts.w_in", "blocks.1.ffn.experts.w_out", "blocks.0.ffn.experts.b_in"):
        assert torch.count_nonzero(one_rank[name][2:]) == 0 and torch.count_nonzero(one_rank[name][:2]) > 0
        assert torch.count_nonzero(empty[name][5]) == 0 and torch.count_nonzero(empty[name][4]) > 0
    natural = reference["deepseek/natural"].grads["blocks.0.ffn.experts.w_in"]
    assert all(torch.count_nonzero(natural[e]) > 0 for e in range(NUM_EXPERTS))  # every expert used
    assert reference["deepseek/natural"].norm > 100 * MAX_NORM  # clipping is active


@pytest.mark.distributed
def test_unused_experts_get_exact_zero_gradients_under_ep(world4, reference):
    for rank, results in enumerate(world4):
        for ep in (2, 4):
            grads = results[(ep, "deepseek/one_rank")].grads
            assert torch.count_nonzero(grads["blocks.1.ffn.experts.w_in"][2:]) == 0, (rank, ep)
            grads = results[(ep, "deepseek/empty_expert")].grads
            assert torch.count_nonzero(grads["blocks.0.ffn.experts.w_out"][5]) == 0, (rank, ep)


@pytest.mark.distributed
def test_checkpoints_move_between_ep_sizes(world4, checkpoint_root, batches):
    """EP 1 -> EP 2 -> EP 4 and EP 2 -> EP 1: the tensors (model and AdamW state) arrive bit for bit
    and every layout computes the same outputs."""
    single = build_model("deepseek", "one_rank")
    optimizer = make_optimizer(single, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    single_checkpoint.load_checkpoint(checkpoint_root / "ep2", single, optimizer)  # saved at EP 2
    saved = load_tensors(checkpoint_root / "ep1" / single_checkpoint.MODEL_FILE)
    resaved = load_tensors(checkpoint_root / "ep2" / single_checkpoint.MODEL_FILE)
    assert saved.keys() == resaved.keys()
    assert all(torch.equal(saved[k], resaved[k]) for k in saved)
    state = load_tensors(checkpoint_root / "ep1" / single_checkpoint.OPTIMIZER_FILE)
    restate = load_tensors(checkpoint_root / "ep2" / single_checkpoint.OPTIMIZER_FILE)
    optimizer_keys = [k for k in state if not k.startswith("rng/")]
    assert optimizer_keys and set(optimizer_keys) == {k for k in restate if not k.startswith("rng/")}
    assert all(torch.equal(state[k], restate[k]) for k in optimizer_keys)
    for rank, results in enumerate(world4):
        moved = results["checkpoint"]
        expected = model_logits(single, batches[rank])
        for ep in (2, 4):
            assert all(torch.equal(moved[ep]["tensors"][k], saved[k]) for k in saved), (rank, ep)
            assert all(torch.equal(moved[ep]["optimizer"][k], state[k]) for k in optimizer_keys), (rank, ep)
            assert relative_error(moved[ep]["logits"], expected) <= 1e-12, (rank, ep)


@pytest.mark.distributed
def test_bad_ep_sizes_are_refused(world4):
    assert "parallel.ep" in world4[0]["bad_ep"] and "world size 4" in world4[0]["bad_ep"]
    with pytest.raises(ConfigError, match=r"parallel\.ep.*number of experts \(8\)"):
        check_ep_size(3, 3, NUM_EXPERTS)
    with pytest.raises(ConfigError, match=r"parallel\.ep.*torchrun"):
        build_mesh(2)  # no process group in this process


def _hang(rank: int, world_size: int) -> None:
    if rank == 0:
        torch.distributed.barrier()  # rank 1 never joins it
    else:
        time.sleep(3600)


@pytest.mark.distributed
def test_a_hang_fails_instead_of_blocking():
    start = time.monotonic()
    with pytest.raises(LocalRunError, match=r"ranks \[0"):
        run_local(_hang, 2, timeout_s=6)
    assert time.monotonic() - start < 30
