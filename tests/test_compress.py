"""Compression: scores move the decisions they should, surgery is exact, quantization is bounded,
the written folders reload, and bad recipes fail with one line."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.analysis.recorder import find_moe_layers
from moekit.compress.calibrate import calibrate, expert_pass
from moekit.compress.merge import (
    merge,
    neuron_permutation,
    permute_neurons,
    subspace_merge,
    union_decomposition,
)
from moekit.compress.prune import prune, top_experts
from moekit.compress.quantize import allocate_bits, gptq, output_error, pack_codes, rtn, unpack_codes
from moekit.compress.quantize_model import quantize_model
from moekit.compress.recipe import QuantizeRecipe
from moekit.compress.scores import SCORES
from moekit.errors import ConfigError, MoekitError
from moekit.layer import MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.spec import preset
from moekit.train.checkpoint import save_checkpoint

pytest.importorskip("scipy")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "compress"


def tiny_lm(seed=0, experts=8):
    torch.manual_seed(seed)
    moe = MoEConfig(hidden_size=32, ff_size=16, router=preset("qwen3_moe", experts, 2))
    config = LMConfig(
        vocab_size=259, hidden_size=32, num_layers=2, num_heads=4, ff_size=64, max_seq_len=64, moe=moe
    )
    return LanguageModel(config).eval()


def random_batches(n=3, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, 24), generator=g)} for _ in range(n)]


def logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"]).logits


# -- scores and pruning --------------------------------------------------------------------------------


def independent_scores(model, batches, layer=0):
    """Frequency and REAP of one layer computed the plain way: capture the layer's input and
    routing, then loop over tokens and their chosen experts in float64."""
    name, moe = find_moe_layers(model)[layer]
    seen = []
    original = moe.forward_with_routing

    def spy(x, *args, **kwargs):
        y, routing = original(x, *args, **kwargs)
        seen.append((x.reshape(-1, x.shape[-1]).double(), routing))
        return y, routing

    moe.forward_with_routing = spy
    try:
        for batch in batches:
            logits(model, batch)
    finally:
        del moe.forward_with_routing
    e = moe.experts.num_experts
    count, reap_sum = torch.zeros(e, dtype=torch.float64), torch.zeros(e, dtype=torch.float64)
    for x, routing in seen:
        kept = routing.kept
        for t, j, w in zip(kept.token.tolist(), kept.expert.tolist(), kept.weight.tolist(), strict=True):
            _, f = expert_pass(moe.experts, j, x[t : t + 1])
            count[j] += 1
            reap_sum[j] += w * float(f.detach().norm())
    return count, torch.where(count > 0, reap_sum / count.clamp_min(1), torch.zeros_like(count))


def test_frequency_and_reap_equal_an_independent_computation():
    model, batches = tiny_lm(), random_batches()
    calibration = calibrate(model, batches)
    count, reap = independent_scores(model, batches)
    stats = calibration.layers[0]
    assert torch.equal(stats.count, count)
    torch.testing.assert_close(stats.reap_sum / stats.count.clamp_min(1), reap, rtol=1e-9, atol=1e-12)
    for method, reference in (("frequency", count), ("reap", reap)):
        kept = prune(model, calibration, method, 4).keep[0]
        assert torch.equal(kept, top_experts(reference, 4))


@pytest.mark.parametrize("method", ["reap", "ean"])
def test_output_scaled_expert_is_kept_by_output_aware_scores_only(method):
    """Scaling one expert's down projection makes its output large without changing layer 0's
    routing: REAP and EAN must now keep it, frequency must not change its decision."""
    model, batches = tiny_lm(), random_batches()
    base = calibrate(model, batches)
    freq_before = prune(model, base, "frequency", 4).keep[0]
    victim = int(prune(model, base, method, 4).keep[0].new_tensor(
        sorted(set(range(8)) - set(prune(model, base, method, 4).keep[0].tolist()))
    )[0])  # fmt: skip
    with torch.no_grad():
        find_moe_layers(model)[0][1].experts.w_out[victim] *= 100.0
    after = calibrate(model, batches)
    assert victim in prune(model, after, method, 4).keep[0].tolist()
    assert torch.equal(prune(model, after, "frequency", 4).keep[0], freq_before)


def test_stun_keeps_one_of_two_identical_router_rows():
    model, batches = tiny_lm(), random_batches()
    with torch.no_grad():
        router = find_moe_layers(model)[0][1].router
        router.weight[5] = router.weight[2]
    kept = prune(model, calibrate(model, batches), "stun", 7).keep[0].tolist()
    assert len(kept) == 7 and (2 in kept) != (5 in kept)


def test_gate_weight_follows_the_router():
    """Giving the least weighted expert four times the router row of the most weighted one makes it
    win that expert's tokens: gate_weight now keeps it."""
    model, batches = tiny_lm(), random_batches()
    calibration = calibrate(model, batches)
    loser, best = (
        int(torch.argmin(calibration.layers[0].gate_sum)),
        int(torch.argmax(calibration.layers[0].gate_sum)),
    )
    assert loser not in prune(model, calibration, "gate_weight", 2).keep[0].tolist()
    with torch.no_grad():
        router = find_moe_layers(model)[0][1].router
        router.weight[loser] = 4.0 * router.weight[best]
    assert loser in prune(model, calibrate(model, batches), "gate_weight", 2).keep[0].tolist()


@pytest.mark.parametrize("method", SCORES)
def test_keeping_every_expert_is_the_original_model(method):
    model, batches = tiny_lm(), random_batches()
    pruned = prune(model, calibrate(model, batches), method, 8).model
    assert torch.equal(logits(pruned, batches[0]), logits(model, batches[0]))


def test_pruning_removes_router_rows_with_their_experts():
    """Pruned model == original with the removed experts' logits forced to -inf, on every token."""
    model, batches = tiny_lm(), random_batches()
    result = prune(model, calibrate(model, batches), "reap", 4)
    name, moe = find_moe_layers(model)[0]
    keep = result.keep[0]
    x = torch.randn(16, 32)
    _, r_orig = moe.forward_with_routing(x)
    y_new, r_new = find_moe_layers(result.model)[0][1].forward_with_routing(x)
    torch.testing.assert_close(r_new.logits, r_orig.logits[:, keep])
    assert moe.experts.w_in[keep].equal(find_moe_layers(result.model)[0][1].experts.w_in)


def test_prune_refuses_fewer_than_top_k():
    model, batches = tiny_lm(), random_batches()
    with pytest.raises(MoekitError, match="top_k=2"):
        prune(model, calibrate(model, batches), "reap", 1)


def test_balanced_calibration_stops_early_or_names_the_idle_experts():
    model = tiny_lm()
    many = random_batches(n=20)
    calibration = calibrate(model, iter(many), min_tokens=2)
    assert calibration.meta["batches"] < 20 and all(bool((s.count >= 2).all()) for s in calibration.layers)
    with pytest.raises(MoekitError, match="fewer than min_tokens=100000"):
        calibrate(model, random_batches(n=1), min_tokens=100000)


# -- merging -------------------------------------------------------------------------------------------


def test_neuron_alignment_recovers_a_permutation_and_keeps_outputs():
    model = tiny_lm()
    experts = find_moe_layers(model)[0][1].experts
    tensors = {"experts.w_in": experts.w_in.detach(), "experts.w_out": experts.w_out.detach()}
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    shuffled = permute_neurons(tensors, 3, perm, 16)
    x = torch.randn(5, 32, dtype=torch.float64)
    ref = expert_pass(experts, 3, x)[1]
    experts_copy = type(experts)(8, 32, 16, experts.activation)
    with torch.no_grad():
        experts_copy.w_in[3], experts_copy.w_out[3] = shuffled["experts.w_in"], shuffled["experts.w_out"]
    torch.testing.assert_close(expert_pass(experts_copy, 3, x)[1], ref)  # a permutation changes nothing
    found = neuron_permutation(
        tensors["experts.w_in"][3],
        tensors["experts.w_out"][3],
        shuffled["experts.w_in"],
        shuffled["experts.w_out"],
    )
    realigned = permute_neurons({k: v.unsqueeze(0) for k, v in shuffled.items()}, 0, found, 16)
    assert torch.equal(realigned["experts.w_in"], tensors["experts.w_in"][3])


def test_merging_identical_experts_is_lossless_and_singletons_are_identity():
    model, batches = tiny_lm(), random_batches()
    same = merge(model, calibrate(model, batches), 8)
    assert torch.equal(logits(same.model, batches[0]), logits(model, batches[0]))
    with torch.no_grad():  # expert 6 := expert 1 with shuffled neurons, and the same router row
        moe = find_moe_layers(model)[0][1]
        perm = torch.randperm(16)
        moe.experts.w_in[6] = torch.cat([moe.experts.w_in[1][:16][perm], moe.experts.w_in[1][16:][perm]])
        moe.experts.w_out[6] = moe.experts.w_out[1][:, perm]
        moe.router.weight[6] = moe.router.weight[1]
    calibration = calibrate(model, batches)
    merged = merge(model, calibration, 7)
    assert merged.labels[0][1] == merged.labels[0][6]
    new = find_moe_layers(merged.model)[0][1].experts
    torch.testing.assert_close(new.w_in[merged.labels[0][1]], moe.experts.w_in[1])
    unaligned = merge(model, calibration, 7, align=False)
    old = find_moe_layers(unaligned.model)[0][1].experts
    assert not torch.allclose(old.w_in[unaligned.labels[0][1]], moe.experts.w_in[1])


def test_sub_moe_at_full_rank_is_exact_for_singletons_and_the_average_for_clusters():
    model, batches = tiny_lm(), random_batches()
    calibration = calibrate(model, batches)
    same = merge(model, calibration, 8, method="sub_moe")
    torch.testing.assert_close(
        logits(same.model, batches[0]), logits(model, batches[0]), atol=1e-5, rtol=1e-5
    )
    averaged = merge(model, calibration, 4)
    subspace = merge(model, calibration, 4, method="sub_moe")
    assert all(torch.equal(a, b) for a, b in zip(averaged.labels, subspace.labels, strict=True))
    full = logits(subspace.model, batches[0])
    torch.testing.assert_close(full, logits(averaged.model, batches[0]), atol=1e-5, rtol=1e-5)
    low = merge(model, calibration, 4, method="sub_moe", rank=4)  # a lower rank moves the logits
    assert not torch.allclose(logits(low.model, batches[0]), full, atol=1e-3)
    for a, b in zip(find_moe_layers(low.model), find_moe_layers(subspace.model), strict=True):
        assert torch.equal(a[1].router.weight, b[1].router.weight)  # router rows: the same average
        assert int(torch.linalg.matrix_rank(a[1].experts.w_out[0].double(), rtol=1e-5)) == 4


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(1, 4), st.integers(0, 2**16))
def test_sub_moe_formula_matches_a_float64_numpy_reference(members, rank, seed):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(members, 6, 5, generator=g, dtype=torch.float64)
    freq = torch.rand(members, generator=g, dtype=torch.float64) + 0.1
    u, s, vt = np.linalg.svd(np.concatenate(list(weights.numpy()), axis=1), full_matrices=False)
    f = (freq / freq.sum()).numpy()
    v_merged = sum(f[i] * vt[:rank, i * 5 : (i + 1) * 5] for i in range(members))
    reference = u[:, :rank] @ np.diag(s[:rank]) @ v_merged
    np.testing.assert_allclose(subspace_merge(weights, freq, rank).numpy(), reference, atol=1e-10)
    u_t, s_t, v_t = union_decomposition(weights)  # full rank: every member is rebuilt exactly
    np.testing.assert_allclose((u_t * s_t) @ v_t.transpose(1, 2), weights.numpy(), atol=1e-10)


def test_joint_svd_beats_per_expert_svd_at_the_same_budget_on_shared_structure():
    """Sub-MoE's argument: experts in a cluster share an output subspace (W_i = B C_i + small
    noise), so one shared U of rank k plus per-expert V costs k(d_out + m d_in) and keeps what m
    per-expert rank-r SVDs (m r (d_out + d_in)) cannot afford at that budget."""
    g = torch.Generator().manual_seed(0)
    m, d_out, d_in, k = 4, 48, 24, 6
    basis = torch.randn(d_out, k, generator=g, dtype=torch.float64)
    weights = torch.stack([basis @ torch.randn(k, d_in, generator=g, dtype=torch.float64) for _ in range(m)])
    weights += 1e-3 * torch.randn(weights.shape, generator=g, dtype=torch.float64)
    u, s, v = union_decomposition(weights, k)
    joint_error = ((u * s) @ v.transpose(1, 2) - weights).norm()
    budget = k * (d_out + m * d_in)
    r = budget // (m * (d_out + d_in))  # the largest per-expert rank within the same budget
    assert 1 <= r < k
    per_expert = torch.stack([(a[:, :r] * b[:r]) @ c[:r] for a, b, c in map(torch.linalg.svd, weights)])
    assert joint_error < 0.01 * (per_expert - weights).norm()
    # and on unstructured experts the shared basis has nothing to exploit
    noise = torch.randn(m, d_out, d_in, generator=g, dtype=torch.float64)
    u, s, v = union_decomposition(noise, k)
    unstructured = ((u * s) @ v.transpose(1, 2) - noise).norm()
    assert unstructured > 0.5 * noise.norm()


def test_sub_moe_rank_errors_name_the_field():
    model, batches = tiny_lm(), random_batches(n=1)
    calibration = calibrate(model, batches)
    for rank in (0, 33, 2.5, True):
        with pytest.raises(ConfigError, match=r"merge\.rank.*1\.\.32"):
            merge(model, calibration, 4, method="sub_moe", rank=rank)
    with pytest.raises(ConfigError, match=r"merge\.rank: only method sub_moe"):
        merge(model, calibration, 4, rank=4)


# -- quantization --------------------------------------------------------------------------------------


@given(
    st.integers(1, 6),
    st.integers(1, 40),
    st.sampled_from([2, 3, 4, 8]),
    st.sampled_from([4, 8, 32]),
    st.integers(0, 99),
)
def test_rtn_error_is_at_most_half_a_step(rows, cols, bits, group, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q = rtn(w, bits, group)
    step = q.scales.double().repeat_interleave(group, dim=1)[:, :cols]
    assert bool(((q.dequantize() - w).abs() <= step / 2 + 1e-6 * step).all())
    assert int(q.codes.max()) < 2**bits


@given(st.integers(1, 200), st.sampled_from([2, 3, 4, 8]), st.integers(0, 99))
def test_packing_round_trips(n, bits, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, (n,)), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(512, 8, generator=g, dtype=torch.float64) @ torch.randn(
        8, 64, generator=g, dtype=torch.float64
    )
    x += 0.1 * torch.randn(512, 64, generator=g, dtype=torch.float64)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    h = x.T @ x
    err_gptq = output_error(w, gptq(w, h, bits, 16).dequantize(), h)
    err_rtn = output_error(w, rtn(w, bits, 16).dequantize(), h)
    assert err_gptq < 0.8 * err_rtn


def test_gptq_at_8_bits_is_close_to_the_float64_weights():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 32, generator=g), torch.randn(100, 32, generator=g)
    q = gptq(w, x.double().T @ x.double(), 8, 32).dequantize()
    assert float((q - w.double()).abs().max()) < 0.05


def brute_force(cost, choices, sizes, mean_bits, forced):
    best = None
    for pick in itertools.product(range(len(choices)), repeat=cost.shape[0]):
        bits = np.array([choices[p] for p in pick])
        if (bits * sizes).sum() > mean_bits * sizes.sum() + 1e-9 or any(bits[forced] != max(choices)):
            continue
        total = sum(cost[e, p] for e, p in enumerate(pick))
        if best is None or total < best[0] - 1e-12:
            best = (total, bits)
    return best


@given(st.integers(0, 999), st.sampled_from([2.5, 3.0, 4.0]))
def test_bit_allocation_is_the_integer_optimum(seed, mean_bits):
    rng = np.random.default_rng(seed)
    choices = [2, 3, 4, 8]
    cost = np.sort(rng.random((5, 4)) * rng.random((5, 1)) * 10, axis=1)[
        :, ::-1
    ].copy()  # more bits, less error
    sizes = rng.integers(1, 4, 5).astype(float)
    forced = np.zeros(5, dtype=bool)
    forced[seed % 5] = mean_bits >= 3.0
    optimum = brute_force(cost, choices, sizes, mean_bits, forced)
    if optimum is None:  # the forced expert alone breaks the budget
        with pytest.raises(ConfigError, match="quantize.mean_bits"):
            allocate_bits(cost, choices, sizes, mean_bits, forced)
        return
    bits = allocate_bits(cost, choices, sizes, mean_bits, forced)
    chosen = sum(cost[e, choices.index(b)] for e, b in enumerate(bits))
    assert (bits * sizes).sum() <= mean_bits * sizes.sum() + 1e-9
    assert chosen == pytest.approx(optimum[0], rel=1e-6, abs=1e-9)


def test_quantized_model_is_bounded_and_packs_what_it_runs():
    from moekit.compress.quantize import Quantized

    model, batches = tiny_lm(), random_batches()
    calibration = calibrate(model, batches, hessians=True)
    result = quantize_model(
        model,
        calibration,
        QuantizeRecipe(algorithm="rtn", bits=8, group_size=16, protect_super_experts=False),
    )
    diff = (logits(result.model, batches[0]) - logits(model, batches[0])).abs().max()
    assert 0 < float(diff) < 0.05
    assert result.bytes_after < result.bytes_before / 3
    name, moe = find_moe_layers(result.model)[1]
    held = result.experts[1]
    q = Quantized(
        held.codes(5, "out"), result.packed[f"{name}.experts.scales_out"][5].float(),
        result.packed[f"{name}.experts.zeros_out"][5].float(), 8, 16,
    )  # fmt: skip
    torch.testing.assert_close(q.dequantize().float(), moe.experts.w_out[5].detach(), atol=0, rtol=0)
    mixed = quantize_model(
        model, calibration, QuantizeRecipe(bits=None, mean_bits=3.0, choices=(2, 4), group_size=16)
    )
    flat = [b for row in mixed.bits for b in row]
    assert set(flat) <= {2, 4} and np.mean(flat) <= 3.0 and len(set(flat)) == 2


# -- HF folders of every family ------------------------------------------------------------------------


def family_checkpoint(family, directory):
    tiny = pytest.importorskip("moekit.interop.tiny")
    overrides = dict(n_group=2, topk_group=1) if family == "deepseek_v3" else {}
    tiny.tiny_model(family, **overrides).save_pretrained(directory)
    return directory


FAMILIES = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "gpt_oss",
    "granitemoe",
    "llama4_text",
    "dbrx",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_and_merged_hf_folders_reload_in_transformers(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    from moekit.interop.hf import from_hf, to_hf

    model = from_hf(family_checkpoint(family, tmp_path / "src"))
    batches = random_batches(n=2)
    calibration = calibrate(model, batches)
    num = calibration.layers[0].num_experts
    for name, compressed in (
        ("prune", prune(model, calibration, "reap", num // 2).model),
        ("merge", merge(model, calibration, num // 2).model),
        ("sub_moe", merge(model, calibration, num // 2, method="sub_moe", rank=4).model),
    ):
        out = to_hf(compressed, tmp_path / name)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert find_moe_layers(from_hf(out))[0][1].experts.num_experts == num // 2
        with torch.no_grad():
            theirs = reloaded(batches[0]["input_ids"]).logits
        torch.testing.assert_close(theirs, logits(compressed, batches[0]), atol=2e-4, rtol=2e-4)
        assert not torch.allclose(logits(compressed, batches[0]), logits(model, batches[0]))


# -- the command line ----------------------------------------------------------------------------------


def save_lm_run(root):
    model = tiny_lm()
    state = {
        "config": {"model": model.config.to_dict(), "data": {"source": "sample", "tokenizer": "byte"}},
        "step": 0,
    }
    save_checkpoint(root / "checkpoints" / "step-0", model, None, state)
    return model


def run(*argv):
    from moekit.cli import main

    return main(["compress", *[str(a) for a in argv]])


def small_recipe(path, base, **calibration):
    import yaml

    data = yaml.safe_load(base.read_text())
    data["calibration"] = {"batches": 3, "batch_size": 2, "seq_len": 32, **calibration}
    data["evaluation"] = {"batches": 2}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_example_recipes_on_a_moekit_lm(recipe, tmp_path, capsys):
    from moekit.analysis.cli import LoadedModel

    save_lm_run(tmp_path / "run")
    out = tmp_path / "out"
    assert (
        run(
            tmp_path / "run",
            "--recipe",
            small_recipe(tmp_path / recipe, CONFIGS / recipe),
            "--calib",
            "sample",
            "--out",
            out,
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    report = json.loads((out / "compress_report.json").read_text())
    assert report["bytes_after"] < report["bytes_before"]
    assert all(0.0 <= a <= 1.0 for a in report["router_topk_agreement"])
    assert set(report["loss_after"]) >= {"all"} and report["calibration"]["tokens"] > 0
    reloaded = LoadedModel(out).model
    assert reloaded.moe_layers[0].experts.num_experts == report["experts_per_layer"]["after"]


def save_char_tokenizer(directory):
    """A character-level tokenizer.json of 96 ids, as an HF checkpoint folder would carry."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = ["[UNK]"] + sorted(set(string.printable) - set("\x0b\x0c\r"))
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.save(str(directory / "tokenizer.json"))


def test_cli_writes_an_hf_folder_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    from moekit.interop.hf import from_hf

    src = family_checkpoint("qwen3_moe", tmp_path / "src")
    save_char_tokenizer(src)
    out = tmp_path / "out"
    recipe = small_recipe(tmp_path / "r.yaml", CONFIGS / "merge-hcsmoe.yaml")
    assert run(src, "--recipe", recipe, "--calib", "sample", "--out", out) == 0
    report = json.loads((out / "compress_report.json").read_text())
    assert report["family"] == "qwen3_moe" and report["experts_per_layer"] == {"before": 8, "after": 4}
    assert sorted(i for group in report["merged"][0] for i in group) == list(range(8))
    ids = random_batches(n=1, vocab=96)[0]["input_ids"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, from_hf(out)(ids).logits, atol=2e-4, rtol=2e-4)
    assert (out / "tokenizer.json").is_file()


def test_bad_inputs_fail_with_one_line_and_write_nothing(tmp_path, capsys):
    save_lm_run(tmp_path / "run")
    out = tmp_path / "out"
    cases = {
        "method: squash\n": "method: got 'squash'",
        "method: prune\nprune: {score: magic}\n": "prune.score: got 'magic'",
        "method: prune\nprune: {keepers: 2}\n": "prune.keepers: unknown field",
        "method: prune\nprune: {keep: 1}\n": "prune.keep: got 1 (1 experts), fewer than the router's top_k=2",
        "method: quantize\nquantize: {bits: 5}\n": "quantize.bits: got 5",
        "method: prune\nwhatever: 1\n": "whatever: unknown field",
        "method: [\n": "cannot read the recipe as YAML",
        "method: merge\nmerge: {method: sub_moe, rank: 0}\n": "merge.rank: got 0",
        "method: merge\nmerge: {method: sub_moe, rank: 500}\n": "merge.rank: got 500",
    }
    for text, message in cases.items():
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text)
        assert run(tmp_path / "run", "--recipe", recipe, "--calib", "sample", "--out", out) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()
    recipe = small_recipe(tmp_path / "ok.yaml", CONFIGS / "prune-reap.yaml", min_tokens=10**6)
    assert run(tmp_path / "run", "--recipe", recipe, "--calib", "sample", "--out", out) == 2
    assert "min_tokens" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    assert run(tmp_path / "run", "--recipe", recipe, "--calib", "sample", "--out", out) == 2
    assert "already exists" in capsys.readouterr().err
    dense = LanguageModel(
        LMConfig(vocab_size=259, hidden_size=32, num_layers=1, num_heads=4, ff_size=64, max_seq_len=64)
    )
    state = {"config": {"model": dense.config.to_dict(), "data": {"tokenizer": "byte"}}, "step": 0}
    save_checkpoint(tmp_path / "dense" / "checkpoints" / "step-0", dense, None, state)
    assert run(tmp_path / "dense", "--recipe", recipe, "--calib", "sample", "--out", tmp_path / "d") == 2
    assert "no moekit MoE layers" in capsys.readouterr().err and not (tmp_path / "d").exists()
