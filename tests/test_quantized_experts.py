"""Packed quantized experts: the codes unpack to what was packed, the on-the-fly dequantization runs
exactly the fake-quantized model (float64, mixed bit widths from the integer program, moekit's LM
and every HF family), only routed experts are dequantized, the packed folder written by
`moekit compress` reloads and runs in `moekit generate` / `moekit eval`, and it is smaller."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.analysis.recorder import find_moe_layers
from moekit.compress.calibrate import calibrate
from moekit.compress.quantize import fp16_ceil, pack_codes, rtn, unpack_codes
from moekit.compress.quantize_model import quantize_model
from moekit.compress.recipe import QuantizeRecipe
from moekit.compress.storage import is_packed_directory, load_packed, resident_bytes
from moekit.experts.activations import make_activation
from moekit.experts.packed import PackedExperts
from moekit.experts.quantized import QuantizedExperts, unpack
from moekit.routing.record import Assignments, Routing

pytest.importorskip("scipy")
sys.path.insert(0, str(Path(__file__).parent))
from test_compress import (  # noqa: E402
    CONFIGS,
    FAMILIES,
    family_checkpoint,
    logits,
    random_batches,
    run,
    save_char_tokenizer,
    small_recipe,
    tiny_lm,
)

MIXED = QuantizeRecipe(
    algorithm="rtn",
    bits=None,
    mean_bits=2.5,
    choices=(2, 3, 4, 8),
    group_size=16,
    protect_super_experts=False,
)


@given(st.integers(1, 300), st.sampled_from([2, 3, 4, 8]), st.integers(0, 99))
def test_unpack_inverts_pack_codes(n, bits, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack(packed, bits, n), codes)
    assert torch.equal(unpack_codes(packed, bits, (n,)), codes)


@given(st.floats(1e-9, 6e4, allow_nan=False))
def test_fp16_ceil_is_the_next_float16_up(x):
    value = torch.tensor([x], dtype=torch.float64)
    up = fp16_ceil(value)
    assert float(up) >= x and float(up.half().double()) == float(up)
    below = (up.half().view(torch.int16) - 1).view(torch.float16).double()
    assert float(below) < x


def random_routing(tokens, experts, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    weight, index = torch.softmax(logits, -1).topk(k, dim=-1)
    kept = Assignments.from_dense(index, weight)
    return Routing(
        logits,
        torch.softmax(logits, -1),
        kept,
        Assignments.empty(),
        torch.ones(tokens, dtype=torch.bool),
        experts,
    )


def quantized_pair(activation, bias, group, seed, experts=5, hidden=24, ff=20):
    """PackedExperts with RTN-quantized weights at mixed widths, and the QuantizedExperts of them."""
    torch.manual_seed(seed)
    act = make_activation(activation)
    dense = PackedExperts(experts, hidden, ff, act, bias=bias).double()
    bits = [(2, 3, 4, 8)[e % 4] for e in range(experts)]
    held = QuantizedExperts(experts, hidden, ff, act, bits, group, bias=bias).double()
    with torch.no_grad():
        for e, b in enumerate(bits):
            for part, weight in (("in", dense.w_in), ("out", dense.w_out)):
                q = rtn(weight[e], b, group)
                weight[e] = q.dequantize()
                held.set_expert(e, part, q.codes, q.scales, q.zeros)
        if bias:
            dense.b_in.normal_()
            dense.b_out.normal_()
            held.b_in.data.copy_(dense.b_in)
            held.b_out.data.copy_(dense.b_out)
    return dense, held


@pytest.mark.parametrize(
    ("activation", "bias", "group", "weight_on"),
    [("swiglu", False, 8, "output"), ("gelu", True, 7, "input"), ("swiglu", True, 32, "output")],
)
def test_compute_equals_the_fake_quantized_experts_in_float64(activation, bias, group, weight_on):
    dense, held = quantized_pair(activation, bias, group, seed=group)
    x = torch.randn(13, 24, dtype=torch.float64)
    routing = random_routing(13, 5, 2, seed=group)
    expected = torch.zeros_like(x)  # the definition, token by token
    a = routing.kept
    for t, e, w in zip(a.token.tolist(), a.expert.tolist(), a.weight.double().tolist(), strict=True):
        if weight_on == "input":
            expected[t] += dense.expert_forward(e, w * x[t : t + 1])[0]
        else:
            expected[t] += w * dense.expert_forward(e, x[t : t + 1])[0]
    torch.testing.assert_close(held.compute(x, routing, weight_on), expected, rtol=1e-12, atol=1e-12)
    for e in range(5):
        torch.testing.assert_close(held.dequantize(e, "in", torch.float64), dense.w_in[e], rtol=0, atol=0)
        torch.testing.assert_close(
            held.expert_forward(e, x), dense.expert_forward(e, x), rtol=1e-12, atol=1e-12
        )


def test_only_routed_experts_are_dequantized_into_one_reused_buffer():
    _, held = quantized_pair("swiglu", False, 8, seed=1, experts=8)
    seen = []
    original = held.dequantize_into

    def spy(expert, part, buffer):
        seen.append((expert, buffer.data_ptr()))
        return original(expert, part, buffer)

    held.dequantize_into = spy
    x = torch.randn(3, 24, dtype=torch.float64)
    with torch.no_grad():
        for seed in range(3):
            seen.clear()
            routing = random_routing(3, 8, 1, seed)
            held.compute(x, routing)
            assert {e for e, _ in seen} == set(routing.kept.expert.tolist())
            assert len({ptr for _, ptr in seen}) == 1
    assert len(set(routing.kept.expert.tolist())) < 8


def test_packed_lm_equals_the_fake_quantized_lm_with_mixed_bits():
    model, batches = tiny_lm(), random_batches()
    result = quantize_model(model, calibrate(model, batches, hessians=True), MIXED)
    assert len({b for row in result.bits for b in row}) > 1
    packed = result.packed_model()
    assert all(isinstance(moe.experts, QuantizedExperts) for moe in packed.moe_layers)
    float_bytes, packed_bytes = resident_bytes(result.model), resident_bytes(packed)
    assert packed_bytes["routed_experts"] * 4 < float_bytes["routed_experts"]
    assert packed_bytes["parameters_and_buffers"] < float_bytes["parameters_and_buffers"]
    torch.testing.assert_close(
        logits(packed, batches[0]), logits(result.model, batches[0]), rtol=1e-5, atol=1e-5
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the products in bf16, as `--dtype bf16`
        torch.testing.assert_close(
            logits(packed, batches[0]).float(), logits(result.model, batches[0]).float(), rtol=0.05, atol=0.05
        )
    fake, packed = result.model.double(), packed.double()
    torch.testing.assert_close(logits(packed, batches[1]), logits(fake, batches[1]), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(logits(fake, batches[1]), logits(model.double(), batches[1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_family_models_equal_their_fake_quantized_models(family, tmp_path):
    from moekit.interop.hf import from_hf

    model = from_hf(family_checkpoint(family, tmp_path / "src"))
    batches = random_batches(n=2)
    result = quantize_model(model, calibrate(model, batches, hessians=True), MIXED)
    assert len({b for row in result.bits for b in row}) > 1
    fake, packed = result.model.double(), result.packed_model().double()
    torch.testing.assert_close(logits(packed, batches[1]), logits(fake, batches[1]), rtol=1e-10, atol=1e-10)


def test_cli_packed_moekit_lm_runs_in_generate_and_eval(tmp_path, capsys):
    from moekit.cli import main
    from moekit.train.checkpoint import save_checkpoint

    model = tiny_lm()
    data = {
        "source": "sample", "tokenizer": "byte", "bpe_vocab_size": 512, "holdout": None,
        "seq_len": 32, "layout": "packed",
    }  # fmt: skip
    save_checkpoint(tmp_path / "run" / "checkpoints" / "step-0", model, None, {
        "config": {"model": model.config.to_dict(), "data": data}, "step": 0
    })  # fmt: skip
    out = tmp_path / "out"
    recipe = small_recipe(tmp_path / "r.yaml", CONFIGS / "quantize-packed-mixed.yaml")
    assert run(tmp_path / "run", "--recipe", recipe, "--calib", "sample", "--out", out) == 0
    assert is_packed_directory(out) and not (out / "state.json").exists()
    report = json.loads((out / "compress_report.json").read_text())
    sizes = report["resident_bytes_float32"]
    assert sizes["packed_model"] < sizes["float_model"] and report["mean_bits"] <= 2.5
    loaded, document = load_packed(out)
    assert document["layers"][0]["bits"] == report["bits"][0]
    assert not any(p.dim() == 3 for p in loaded.parameters())  # no float expert stack resident
    capsys.readouterr()
    generated = tmp_path / "g.json"
    assert (
        main(
            [
                "generate",
                str(out),
                "--prompt",
                "ab",
                "--max-new-tokens",
                "4",
                "--quiet",
                "--json",
                str(generated),
            ]
        )
        == 0
    )
    assert json.loads(generated.read_text())["new_tokens"] == 4
    capsys.readouterr()
    assert main(["eval", str(out), "--batches", "1"]) == 0
    losses = json.loads(capsys.readouterr().out)["loss"]
    assert all(0 < v < 10 for v in losses.values())


def test_cli_packed_hf_family_generates_like_the_in_memory_model(tmp_path):
    from moekit.analysis.cli import LoadedModel
    from moekit.cli import main

    src = family_checkpoint("qwen3_moe", tmp_path / "src")
    save_char_tokenizer(src)
    out = tmp_path / "out"
    recipe = small_recipe(tmp_path / "r.yaml", CONFIGS / "quantize-packed-mixed.yaml")
    assert run(src, "--recipe", recipe, "--calib", "sample", "--out", out) == 0
    loaded = LoadedModel(out)
    assert loaded.kind == "hf" and isinstance(find_moe_layers(loaded.model)[0][1].experts, QuantizedExperts)
    ids = random_batches(n=1, vocab=96)[0]
    report = json.loads((out / "compress_report.json").read_text())
    assert report["family"] == "qwen3_moe" and report["bytes_after"] < report["bytes_before"] / 1.5
    assert main(["generate", str(out), "--prompt", "ab", "--max-new-tokens", "3", "--quiet"]) == 0
    assert torch.isfinite(logits(loaded.model, ids)).all()


def test_rss_falls_when_a_packed_model_replaces_the_float_one(tmp_path):
    """Loaded in fresh processes, the packed LM (4-bit experts) adds less resident memory than the
    same LM with float experts, loaded the usual way."""
    from moekit.compress.storage import save_packed, with_quantized_experts
    from moekit.layer import MoEConfig
    from moekit.models.lm import LanguageModel, LMConfig
    from moekit.routing.spec import preset
    from moekit.train.checkpoint import save_checkpoint

    moe = MoEConfig(hidden_size=64, ff_size=64, router=preset("qwen3_moe", 64, 2))
    config = LMConfig(
        vocab_size=259, hidden_size=64, num_layers=2, num_heads=4, ff_size=64, max_seq_len=64, moe=moe
    )
    model = LanguageModel(config).eval()
    save_checkpoint(
        tmp_path / "float", model, None, {"config": {"model": config.to_dict(), "data": {}}, "step": 0}
    )
    experts = [
        QuantizedExperts(64, 64, 64, m.experts.activation, [4] * 64, 32) for m in model.moe_layers
    ]  # fmt: skip
    (tmp_path / "packed").mkdir()
    save_packed(with_quantized_experts(model, experts), tmp_path / "packed")
    script = """
import sys
from pathlib import Path
import torch
from moekit.analysis.cli import load_moekit_model
from moekit.compress.storage import load_packed, read_meta, rss_bytes
from moekit.models.lm import LanguageModel, LMConfig
with torch.device("meta"):  # first-use costs (imports, lazily built state) outside the delta
    LanguageModel(LMConfig.from_dict(read_meta(Path(sys.argv[3]))["config"]))
before = rss_bytes()
load = load_packed if sys.argv[1] == "packed" else load_moekit_model
model = load(Path(sys.argv[2]))[0]
print(rss_bytes() - before)
"""
    runs = {  # both at once: the two cores
        kind: subprocess.Popen(
            [sys.executable, "-c", script, kind, str(tmp_path / kind), str(tmp_path / "packed")],
            stdout=subprocess.PIPE,
            text=True,
        )
        for kind in ("float", "packed")
    }
    deltas = {kind: int(process.communicate()[0]) for kind, process in runs.items()}
    assert all(process.returncode == 0 for process in runs.values())
    expert_bytes = 2 * 64 * (128 * 64 + 64 * 64) * 4
    assert deltas["float"] - deltas["packed"] > expert_bytes / 2, deltas


def test_bad_storage_and_damaged_folders_fail_with_one_line(tmp_path, capsys):
    from moekit.cli import main

    model, batches = tiny_lm(), random_batches(n=1)
    from moekit.compress.storage import META_FILE, save_packed

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: quantize\nquantize: {bits: 4, storage: zip}\n")
    assert run(tmp_path / "nowhere", "--recipe", recipe, "--calib", "sample", "--out", tmp_path / "o") == 2
    assert "quantize.storage: got 'zip'" in capsys.readouterr().err
    result = quantize_model(model, calibrate(model, batches, hessians=True), MIXED)
    out = tmp_path / "packed"
    out.mkdir()
    save_packed(result.packed_model(), out, extra={"run_config": {"model": model.config.to_dict()}})
    document = json.loads((out / META_FILE).read_text())
    document["layers"][0]["bits"][0] = 8 if document["layers"][0]["bits"][0] != 8 else 2
    (out / META_FILE).write_text(json.dumps(document))
    assert main(["generate", str(out), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert "codes_in" in err and err.count("\n") == 1, err
    document["version"] = 99
    (out / META_FILE).write_text(json.dumps(document))
    assert main(["generate", str(out), "--prompt", "a"]) == 2
    assert "version 99" in capsys.readouterr().err


def test_packed_storage_sizes_follow_the_bit_widths():
    act = make_activation("swiglu")
    sizes = {b: QuantizedExperts(4, 64, 32, act, [b] * 4, 32).codes_in.numel() for b in (2, 3, 4, 8)}
    assert sizes == {b: 4 * 64 * 64 * b // 8 for b in (2, 3, 4, 8)}
