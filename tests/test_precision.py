"""bf16 mixed precision and device placement: bf16 against float64 and fp32, the router kept in fp32,
the device-chosen expert plan, checkpoints across devices. CUDA-only tests skip without a GPU."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moekit import MoE, MoEConfig, preset
from moekit.balance.config import BalanceConfig
from moekit.data.lmdata import prepare_data
from moekit.device import autocast, bf16_speed_note, cpu_flags, resolve_device, resolve_dtype
from moekit.dispatch.grouped import (
    ExpertPlan,
    GroupedExperts,
    PortableLoops,
    grouped_mm_available,
    portable_plan,
)
from moekit.dispatch.reference import reference_moe
from moekit.errors import ConfigError
from moekit.experts.activations import make_activation
from moekit.train.checkpoint import load_checkpoint, resolve_checkpoint
from moekit.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_config  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (this machine has none)")
CPU = torch.device("cpu")
# bf16 keeps 8 significant bits: one rounding is a relative error of up to 2^-9; a layer's
# output goes through a few (inputs, weights, two products, the activation)
BF16_RELATIVE_TOLERANCE = 2e-2
# bf16 vs fp32 training of the tiny model: the gap in the mean LM loss of the last steps
LOSS_GAP_TOLERANCE = 0.02
# share of top-k assignments (layer, token, expert) that bf16 and fp32 make alike: the same
# weights in either precision, and models trained in either
SAME_WEIGHTS_ROUTING_AGREEMENT = 0.95
ROUTING_AGREEMENT = 0.9


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).norm() / want.detach().double().norm())


def small_layer(num_shared: int = 1) -> MoE:
    spec = preset("qwen3_moe", 8, 2)
    layer = MoE(MoEConfig(hidden_size=32, ff_size=48, router=spec, num_shared_experts=num_shared))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


@pytest.fixture(scope="module")
def sample_data():
    return prepare_data("sample", log=lambda _: None)


def test_bf16_layer_matches_float64_reference_within_bf16_tolerance():
    layer = small_layer()
    x = torch.randn(4, 16, 32, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    ref = reference_moe(layer.double(), x_ref, None)
    upstream = torch.randn_like(ref.output)
    (ref.output * upstream).sum().backward()
    layer = layer.float()

    results = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        layer.zero_grad()
        x_run = x.float().requires_grad_()
        with autocast(CPU, dtype):
            y, routing = layer.forward_with_routing(x_run)
        (y.float() * upstream.float()).sum().backward()
        results[name] = (y, routing, x_run.grad, layer.experts.w_in.grad.clone())

    y, routing, grad_x, grad_w_in = results["bf16"]
    assert y.dtype == torch.bfloat16  # the products really ran in bf16
    assert routing.scores.dtype == torch.float32  # the router did not
    assert layer.experts.w_in.grad.dtype == torch.float32  # fp32 master weights get fp32 gradients
    errors = {
        "output": relative_error(y, ref.output),
        "grad_x": relative_error(grad_x, x_ref.grad),
        "grad_w_in": relative_error(grad_w_in, ref.params["experts.w_in"].grad),
    }
    for key, error in errors.items():
        assert error < BF16_RELATIVE_TOLERANCE, (key, error)
    # and bf16 is measurably less exact than fp32 (it is not silently fp32)
    fp32_error = relative_error(results["fp32"][0], ref.output)
    assert fp32_error < 1e-5
    assert errors["output"] > 10 * fp32_error


def test_router_arithmetic_stays_fp32_under_autocast():
    layer = small_layer(num_shared=0)
    x = torch.randn(64, 32)
    plain = layer.router(x)
    with autocast(CPU, torch.bfloat16):
        _, mixed = layer.forward_with_routing(x)
    assert mixed.logits.dtype == mixed.scores.dtype == torch.float32
    assert torch.equal(mixed.logits, plain.logits)
    assert torch.equal(mixed.kept.expert, plain.kept.expert)


def _expert_inputs(dtype: torch.dtype, num_experts: int = 8, tokens: int = 40):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 32, generator=gen).to(dtype)
    expert = torch.randint(0, num_experts, (2 * tokens,), generator=gen)
    expert[: num_experts // 2] = torch.arange(num_experts // 2)  # every other expert may be empty
    expert, order = expert.sort(stable=True)
    token = torch.arange(tokens).repeat(2)[order]
    weight = torch.rand(2 * tokens, generator=gen)
    w_in = (torch.randn(num_experts, 2 * 48, 32, generator=gen) * 0.2).to(dtype)
    w_out = (torch.randn(num_experts, 32, 48, generator=gen) * 0.2).to(dtype)
    return x, token, expert, weight, w_in, w_out


def _expert_reference(x, token, expert, weight, w_in, w_out, activation):
    x, w_in, w_out, weight = x.double(), w_in.double(), w_out.double(), weight.double()
    out = torch.zeros_like(x)
    for t, e, w in zip(token.tolist(), expert.tolist(), weight, strict=True):
        h = activation.forward(w_in[e] @ x[t])
        out[t] += w * (w_out[e] @ h)
    return out


@pytest.mark.parametrize("backend", ["auto", "loop", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_plan_matches_reference(backend, dtype):
    """The plan a GPU gets (chosen by device: grouped_mm or a plain loop, no CPU machinery), run
    here on CPU tensors against the float64 reference, forward and weight gradients."""
    if backend != "loop" and not grouped_mm_available():
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    activation = make_activation("swiglu")
    x, token, expert, weight, w_in, w_out = _expert_inputs(dtype)
    plan = portable_plan(x, token, expert, w_in, w_out, activation, "output", backend)
    assert isinstance(plan, ExpertPlan) and plan.path == "portable"
    assert plan.loops == PortableLoops(plan.groups, grouped_mm=backend != "loop")
    w_in.requires_grad_()
    w_out.requires_grad_()
    y = GroupedExperts.apply(x, weight, w_in, w_out, None, None, plan)
    y.float().sum().backward()

    w_in_ref = w_in.detach().double().requires_grad_()
    ref = _expert_reference(x, token, expert, weight, w_in_ref, w_out.detach(), activation)
    ref.sum().backward()
    tolerance = 1e-5 if dtype == torch.float32 else BF16_RELATIVE_TOLERANCE
    assert relative_error(y, ref) < tolerance
    assert relative_error(w_in.grad, w_in_ref.grad) < tolerance
    empty = sorted(set(range(8)) - set(expert.tolist()))
    for e in empty:
        assert torch.count_nonzero(w_in.grad[e]) == 0


def test_bf16_training_tracks_fp32(tmp_path, sample_data):
    """The tiny MoE trained for a few steps in bf16 and fp32 from the same initialisation: loss
    curves within LOSS_GAP_TOLERANCE, and the two models route the same tokens alike. Without the
    aux-loss-free bias: its sign-of-error updates turn a one-token difference in an expert's count
    into a full step of its bias, so two runs that differ in rounding (bf16, or a different GEMM
    kernel) soon route differently whatever the precision."""
    steps = 8
    runs = {}
    for dtype in ("fp32", "bf16"):
        torch.manual_seed(0)
        config = tiny_config(tmp_path / dtype, steps=steps, dtype=dtype, device="cpu")
        config = replace(config, balance=BalanceConfig(objectives=config.balance.objectives))
        trainer = Trainer(config, data=sample_data, log=lambda _: None)
        runs[dtype] = (trainer, [trainer.train_step().lm_loss for _ in range(steps)])
    fp32, bf16 = runs["fp32"][1], runs["bf16"][1]
    assert fp32[-1] < fp32[0] - 0.3  # it trained
    gaps = [abs(a - b) for a, b in zip(fp32, bf16, strict=True)]
    assert max(gaps) < LOSS_GAP_TOLERANCE, gaps

    # routing agreement, on a held-out batch: the fp32-trained model run in bf16 against itself in
    # fp32 (the precision alone), and the two models (precision and its effect on training)
    batch = next(sample_data.eval_batches(sample_data.domains[0], "validation", batch_size=4, seq_len=32))
    fp32_model, bf16_model = runs["fp32"][0].model.eval(), runs["bf16"][0].model.eval()
    same_weights = _assignment_agreement(
        _choices(fp32_model, batch, "fp32"), _choices(fp32_model, batch, "bf16")
    )
    trained = _assignment_agreement(_choices(fp32_model, batch, "fp32"), _choices(bf16_model, batch, "bf16"))
    assert same_weights >= SAME_WEIGHTS_ROUTING_AGREEMENT, same_weights
    assert trained >= ROUTING_AGREEMENT, trained


def _choices(model, batch, dtype: str) -> set[tuple[int, int, int]]:
    """Every (layer, token, expert) the model chooses on `batch` in `dtype`."""
    with torch.no_grad(), autocast(CPU, resolve_dtype(dtype)):
        out = model(batch.input_ids, positions=batch.positions, doc_ids=batch.doc_ids)
    return {
        (layer, t, e)
        for layer, r in enumerate(out.routings)
        for t, e in zip(r.kept.token.tolist(), r.kept.expert.tolist(), strict=True)
    }


def _assignment_agreement(a: set, b: set) -> float:
    """Share of the top-k assignments the two routings have in common."""
    assert len(a) == len(b) > 0
    return len(a & b) / len(a)


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ConfigError, match="train.dtype"):
        resolve_dtype("fp16")
    if not CUDA:
        with pytest.raises(ConfigError, match="train.device.*no CUDA device"):
            resolve_device("cuda")


def test_config_rejects_unknown_device_and_dtype(tmp_path):
    with pytest.raises(ConfigError, match="train.device"):
        tiny_config(tmp_path, device="tpu")
    with pytest.raises(ConfigError, match="train.dtype"):
        tiny_config(tmp_path, dtype="fp8")


def test_bf16_speed_note_follows_cpu_flags(monkeypatch):
    import moekit.device as device

    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2"}))
    assert "emulated" in bf16_speed_note(CPU)
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert bf16_speed_note(CPU) is None
    assert bf16_speed_note(torch.device("cuda")) is None
    assert isinstance(cpu_flags(), frozenset)


def test_bf16_checkpoint_holds_fp32_weights(tmp_path, sample_data):
    trainer = Trainer(
        tiny_config(tmp_path, steps=1, dtype="bf16", device="cpu"), data=sample_data, log=lambda _: None
    )
    trainer.run()
    fresh = Trainer(tiny_config(tmp_path / "x", steps=1, device="cpu"), data=sample_data, log=lambda _: None)
    load_checkpoint(resolve_checkpoint(tmp_path), fresh.model)
    for name, tensor in fresh.model.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, trainer.model.state_dict()[name]), name


@needs_cuda
def test_cuda_training_checkpoint_loads_on_cpu(tmp_path, sample_data):
    trainer = Trainer(
        tiny_config(tmp_path, steps=2, dtype="bf16", device="cuda"), data=sample_data, log=lambda _: None
    )
    assert next(trainer.model.parameters()).is_cuda
    trainer.run()
    cpu = Trainer(tiny_config(tmp_path / "cpu", steps=2, device="cpu"), data=sample_data, log=lambda _: None)
    load_checkpoint(resolve_checkpoint(tmp_path), cpu.model, cpu.optimizer)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor.cpu(), cpu.model.state_dict()[name]), name


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_expert_plan_matches_cpu(dtype):
    activation = make_activation("swiglu")
    x, token, expert, weight, w_in, w_out = _expert_inputs(dtype)
    cpu = GroupedExperts.apply(
        x, weight, w_in, w_out, None, None, portable_plan(x, token, expert, w_in, w_out, activation)
    )
    moved = [t.cuda() for t in (x, token, expert, weight, w_in, w_out)]
    from moekit.dispatch.grouped import plan_experts

    plan = plan_experts(*moved[:3], *moved[4:], activation)
    assert plan.path == "portable"
    gpu = GroupedExperts.apply(moved[0], moved[3], moved[4], moved[5], None, None, plan)
    tolerance = 1e-4 if dtype == torch.float32 else BF16_RELATIVE_TOLERANCE
    assert relative_error(gpu.cpu(), cpu) < tolerance


def test_eval_cli_device_and_dtype(tmp_path, sample_data, capsys):
    import json

    from moekit.cli import main as cli_main

    Trainer(tiny_config(tmp_path, steps=1, device="cpu"), data=sample_data, log=lambda _: None).run()
    losses = {}
    for dtype in ("fp32", "bf16"):
        args = [str(tmp_path), "--batches", "1", "--device", "cpu", "--dtype", dtype]
        assert cli_main(["eval", *args]) == 0
        losses[dtype] = json.loads(capsys.readouterr().out)["loss"]["mean"]
    assert abs(losses["fp32"] - losses["bf16"]) < LOSS_GAP_TOLERANCE
    if not CUDA:
        assert cli_main(["eval", str(tmp_path), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--device" in err[0] and "no CUDA device" in err[0]


def test_kernel_probe_is_not_recast_by_autocast():
    """The oneDNN probe may first run inside a bf16 forward: autocast must not recast its fp32
    reference product (it once raised 'Float did not match BFloat16')."""
    from moekit.kernels import gemm

    gemm.onednn_is_faster.cache_clear()
    try:
        with autocast(CPU, torch.bfloat16):
            for dtype in (torch.float32, torch.bfloat16):
                assert isinstance(gemm.onednn_is_faster(dtype), bool)
    finally:
        gemm.onednn_is_faster.cache_clear()


FIRST_FORWARD_UNDER_AUTOCAST = """
import json, torch
from moekit import MoE, MoEConfig, preset
from moekit.kernels import native
torch.manual_seed(0)
layer = MoE(MoEConfig(hidden_size=32, ff_size=48, router=preset("qwen3_moe", 4, 2)))
x = torch.randn(24, 32)
with torch.autocast("cpu", dtype=torch.bfloat16):
    y = layer(x)
print(json.dumps({"finite": bool(torch.isfinite(y).all()), "checked": list(native._built_and_checked())}))
"""


def test_expert_kernels_probe_is_not_recast_by_autocast():
    """A process's first MoE forward may run under bf16 autocast, which probes the expert kernels:
    their fp32 reference products must not be recast (it raised 'Float did not match BFloat16'),
    and the probes must pass as they do outside autocast."""
    import json
    import subprocess

    from moekit.kernels import native

    done = subprocess.run(
        [sys.executable, "-c", FIRST_FORWARD_UNDER_AUTOCAST], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state["finite"]
    assert state["checked"] == list(native._built_and_checked())


@pytest.mark.skipif(CUDA, reason="checks the message shown where there is no GPU")
def test_gpu_smoke_without_gpu_exits_2_with_one_line():
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_bf16_autocast_on_every_hf_family(tmp_path, monkeypatch):
    """Every family `from_hf` loads runs under bf16 autocast: its MoE layers' routing stays fp32
    and the logits stay within bf16 tolerance of fp32's."""
    pytest.importorskip("transformers", reason="the HF families need the `hf` extra (transformers)")
    from moekit.interop.hf import from_hf
    from moekit.interop.tiny import TINY_CONFIGS, tiny_model

    routings = []
    original = MoE.forward_with_routing

    def recording(self, *args, **kwargs):
        y, routing = original(self, *args, **kwargs)
        routings.append(routing)
        return y, routing

    monkeypatch.setattr(MoE, "forward_with_routing", recording)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    for family in TINY_CONFIGS:
        folder = tmp_path / family
        tiny_model(family, seed=1).save_pretrained(folder)
        model = from_hf(folder).eval()
        with torch.no_grad():
            fp32 = model(input_ids=ids).logits
            routings.clear()
            with autocast(CPU, torch.bfloat16):
                bf16 = model(input_ids=ids).logits
        assert routings, family
        assert all(r.logits.dtype == torch.float32 for r in routings), family
        assert relative_error(bf16, fp32) < 3 * BF16_RELATIVE_TOLERANCE, family


def test_ranks_take_their_local_gpu_and_nccl(monkeypatch):
    """With GPUs present (simulated: only torch's answers are replaced), `auto` places torchrun's
    local rank r on GPU r mod count, and the process groups use NCCL for CUDA tensors."""
    from moekit.distributed.mesh import default_backend

    assert default_backend() == ("cpu:gloo,cuda:nccl" if CUDA else "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cpu", local_rank=1) == CPU
    assert default_backend() == "cpu:gloo,cuda:nccl"
