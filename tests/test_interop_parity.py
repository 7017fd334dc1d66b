"""HF checkpoint -> moekit -> HF checkpoint, for every supported family, offline and in fp32.

For tiny random models saved by transformers in both expert layouts (v4 per-expert, v5 packed):
moekit's logits match at every real token of a padded batch, every MoE layer picks the same
experts for every real token, the export loads back into transformers with the same logits, and
the tensors and the config survive the round trip unchanged.
"""

import pytest
import torch

pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from moekit.interop.convert import moekit_to_hf  # noqa: E402
from moekit.interop.families import FAMILIES  # noqa: E402
from moekit.interop.hf import from_hf, load_family, save_family, to_hf  # noqa: E402
from moekit.interop.tiny import TINY_CONFIGS, tiny_model  # noqa: E402

LAYOUTS = {"per_expert": True, "packed": False}  # save_pretrained(save_original_format=...)
CASES = {family: {} for family in TINY_CONFIGS}
# DeepSeek without the low-rank query, with half-split RoPE and without YaRN
CASES["deepseek_v3_plain"] = dict(q_lora_rank=None, rope_interleave=False, rope_parameters=None)
ATOL = 1e-5


def _family(case):
    return "deepseek_v3" if case == "deepseek_v3_plain" else case


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (HF model, {layout: folder}); built once per case."""
    cache = {}

    def get(case):
        if case not in cache:
            model = tiny_model(_family(case), seed=1, **CASES[case])
            folders = {}
            for layout, original in LAYOUTS.items():
                folder = tmp_path_factory.mktemp(f"{case}_{layout}")
                model.save_pretrained(folder, save_original_format=original)
                folders[layout] = folder
            cache[case] = (model, folders)
        return cache[case]

    return get


def _batch(vocab=128, seq=12):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (3, seq), generator=gen)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    return ids, mask


def _hf_topk(model, ids, mask, **kwargs):
    """HF's logits and the top-k expert ids [T, k] each MoE layer's experts module received
    (Llama 4's experts see every expert's input, so its ids come from the router's top-k)."""
    chosen = []
    routers = [m for m in model.modules() if type(m).__name__ == "Llama4Router"]
    k = model.config.num_experts_per_tok if routers else None
    hooks = [
        m.register_forward_hook(lambda _m, _a, out: chosen.append(out[1].topk(k).indices)) for m in routers
    ]
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts") and not routers]
    hooks += [m.register_forward_pre_hook(lambda _m, args: chosen.append(args[1].detach())) for m in experts]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, chosen


def _moekit_topk(routing, k):
    ids = torch.full((routing.num_tokens, k), -1, dtype=torch.long)
    ids[routing.kept.token, routing.kept.rank] = routing.kept.expert
    return ids


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_logits_and_expert_choices_match_transformers(saved, case, layout):
    hf_model, folders = saved(case)
    model = from_hf(folders[layout])
    assert model.config.hf_layout == layout or model.config.family in ("gpt_oss", "dbrx", "llama4_text")
    ids, mask = _batch()
    hf_logits, hf_choices = _hf_topk(hf_model, ids, mask)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    real = mask.bool()
    assert out.logits.shape == hf_logits.shape
    torch.testing.assert_close(out.logits[real], hf_logits[real], atol=ATOL, rtol=0)
    assert len(out.routings) == len(hf_choices) == sum(model.config.moe_layers)
    flat_real = real.reshape(-1)
    for layer, (routing, hf_ids) in enumerate(zip(out.routings, hf_choices, strict=True)):
        k = hf_ids.shape[1]
        ours = _moekit_topk(routing, k)
        assert torch.equal(ours[flat_real].sort(dim=1).values, hf_ids[flat_real].sort(dim=1).values), layer
        assert bool((ours[~flat_real] == -1).all()), "padding must get no experts"


@pytest.mark.parametrize("case", ["qwen3_moe", "gpt_oss", "deepseek_v3", "dbrx", "llama4_text"])
def test_packed_rows_match_transformers(saved, case):
    """Position ids that restart mark packed documents (transformers' training-time packing)."""
    hf_model, folders = saved(case)
    model = from_hf(folders["packed"])
    ids, _ = _batch()
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).expand(3, -1)
    with torch.no_grad():
        expected = hf_model(input_ids=ids, position_ids=positions, use_cache=False).logits
        got = model(ids, position_ids=positions).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_export_reloads_in_transformers_unchanged(saved, case, layout, tmp_path):
    hf_model, folders = saved(case)
    model = from_hf(folders[layout])
    out = to_hf(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf_model)
    ids, mask = _batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    # every tensor comes back bit for bit, under the same names
    source = load_file(folders[layout] / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(source)
    for key, tensor in source.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    # and so does the config, field for field
    original = transformers.AutoConfig.from_pretrained(folders[layout]).to_dict()
    written = transformers.AutoConfig.from_pretrained(out).to_dict()
    skip = {"transformers_version", "_name_or_path"}
    assert {k: v for k, v in written.items() if k not in skip} == {
        k: v for k, v in original.items() if k not in skip
    }


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_export_in_the_other_layout_loads_in_transformers(saved, case, tmp_path):
    hf_model, folders = saved(case)
    model = from_hf(folders["per_expert"])
    out = to_hf(model, tmp_path / "export", layout="packed")
    keys = load_file(out / "model.safetensors").keys()
    if case != "gpt_oss":  # GPT-OSS has one layout only
        assert not any(".experts.0." in k for k in keys)
        assert from_hf(out).config.hf_layout == "packed"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = _batch()
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask).logits
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_moekit_family_checkpoint_round_trip(saved, tmp_path):
    _, folders = saved("deepseek_v3")
    model = from_hf(folders["packed"])
    save_family(model, tmp_path / "ours")
    again = load_family(tmp_path / "ours")
    assert again.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert again.layers[1].ffn.router.selection_bias.dtype == torch.float32
    out = to_hf(again, tmp_path / "hf")
    source, exported = (
        load_file(folders["packed"] / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert sorted(source) == sorted(exported)
    assert all(torch.equal(source[k], exported[k]) for k in source)


def test_sharded_checkpoints_load_and_dtype_casts_keep_the_selection_bias_fp32(tmp_path):
    hf_model = tiny_model("deepseek_v3", seed=4)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = from_hf(tmp_path / "sharded")
    ids, mask = _batch()
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    half = from_hf(tmp_path / "sharded", dtype=torch.bfloat16)
    assert half.embed.weight.dtype == torch.bfloat16
    assert half.layers[1].ffn.router.selection_bias.dtype == torch.float32
    with torch.no_grad():
        assert half(ids).logits.dtype == torch.bfloat16


def _real_token_loss(logits, ids, mask):
    """Next-token cross-entropy over pairs of real tokens (the same formula for both models)."""
    targets = ids[:, 1:].masked_fill(~(mask[:, 1:].bool() & mask[:, :-1].bool()), -100)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100
    )


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_transformers(saved, case):
    """The imported model trains like the original: same loss, same gradient for every tensor
    (moekit's gradients mapped to HF's names and layout by the same rules as the weights)."""
    _, folders = saved(case)
    model = from_hf(folders["packed"]).train()
    reference = transformers.AutoModelForCausalLM.from_pretrained(folders["packed"]).train()
    ids, mask = _batch()
    ours = _real_token_loss(model(ids, attention_mask=mask).logits, ids, mask)
    theirs = _real_token_loss(reference(input_ids=ids, attention_mask=mask).logits, ids, mask)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    params = dict(model.named_parameters())
    grads = {k: params[k].grad if k in params else torch.zeros_like(v) for k, v in model.state_dict().items()}
    spec = FAMILIES[model.config.family]
    mapped = moekit_to_hf(spec, model.config, "packed", grads)
    for name, p in reference.named_parameters():
        assert p.grad is not None and mapped[name] is not None, name
        scale = p.grad.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(mapped[name] / scale, p.grad / scale, atol=2e-5, rtol=0, msg=name)
