"""BAM's attention experts (#31): the mixture of attention against a loop over dense attention
modules (float64), KV caching, routing overrides, the parallel block, `mix` with attention experts
(a forced expert reproduces its branch), opt-out, recipes and the HF refusal."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.domains.experts import add_expert, remove_expert
from moekit.domains.mix import MixOptions, mix_lm
from moekit.domains.recipe import BuildRecipe
from moekit.errors import ConfigError, MoekitError
from moekit.models.attention_experts import (
    AttentionExperts,
    AttentionExpertsConfig,
    override_attention_routing,
)
from moekit.models.lm import Attention, LanguageModel, LMConfig, rope_tables
from moekit.routing.override import RoutingOverride, override_routing

CONFIG = LMConfig(
    vocab_size=61, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, ff_size=24, max_seq_len=32
)
QWEN3_LIKE = replace(CONFIG, attention_bias="all", qk_norm=True, attention_head_dim=6)
IDS = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(5))


def _layer(experts, top_k=0, shared_kv=False, kv_heads=2, seed=0, base=CONFIG):
    config = replace(
        base,
        num_kv_heads=kv_heads,
        attention_experts=AttentionExpertsConfig(experts, top_k=top_k, shared_kv=shared_kv),
    )
    torch.manual_seed(seed)
    layer = AttentionExperts(config).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return config, layer


def _dense_expert(config, layer, e):
    """A dense moekit `Attention` holding expert e's tensors (and the shared K/V if shared)."""
    dense = Attention(config).double()
    shared = {n: t for n, t in layer.state_dict().items() if not n.startswith(("experts.", "router."))}
    dense.load_state_dict({**shared, **layer.experts[e].state_dict()})  # strict: every tensor named
    return dense


def _inputs(config, batch=2, seq=9, seed=1):
    x = torch.randn(batch, seq, config.hidden_size, generator=torch.Generator().manual_seed(seed)).double()
    positions = torch.arange(seq).expand(batch, seq)
    cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, x.dtype)
    return x, cos, sin


@settings(max_examples=12, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(0, 3),
    st.booleans(),
    st.sampled_from([1, 2, 4]),
    st.booleans(),
    st.integers(0, 1000),
)
def test_mixture_of_attention_is_the_router_weighted_sum_of_dense_attentions(
    experts, k, shared, kv, qwen3, seed
):
    """Reference: a loop over dense attention modules weighted by softmax router probabilities
    (soft: all of them; top-k: the k largest, renormalised); also with Qwen3's attention (biases,
    query/key norms, a head size of its own)."""
    k = min(k, experts)
    base = QWEN3_LIKE if qwen3 else CONFIG
    config, layer = _layer(experts, top_k=k, shared_kv=shared, kv_heads=kv, seed=seed, base=base)
    x, cos, sin = _inputs(config, seed=seed)
    y, routing = layer.forward_with_routing(x, cos, sin, None)
    probs = torch.softmax(x.reshape(-1, 16) @ layer.router.weight.T, dim=-1)
    if k:
        top = probs.topk(k, dim=-1)
        probs = torch.zeros_like(probs).scatter(1, top.indices, top.values)
        probs = probs / probs.sum(-1, keepdim=True)
    want = sum(probs[:, e, None] * _dense_expert(config, layer, e)(x, cos, sin, None).reshape(-1, 16)
               for e in range(experts))  # fmt: skip
    torch.testing.assert_close(y.reshape(-1, 16), want, rtol=0, atol=1e-12)
    assert routing.num_experts == experts and routing.experts_per_token().eq(k or experts).all()


@pytest.mark.parametrize("shared", [False, True])
def test_a_forced_attention_expert_is_that_dense_attention_exactly(shared):
    config, layer = _layer(3, shared_kv=shared)
    x, cos, sin = _inputs(config)
    for e in range(3):
        layer.routing_override = RoutingOverride(force=[e], top_k=1)
        y = layer(x, cos, sin, None)
        torch.testing.assert_close(y, _dense_expert(config, layer, e)(x, cos, sin, None), rtol=0, atol=1e-13)
    layer.routing_override = None
    soft = layer(x, cos, sin, None)
    assert (soft - _dense_expert(config, layer, 0)(x, cos, sin, None)).abs().max() > 1e-3  # routing matters


@pytest.mark.parametrize("shared", [False, True])
def test_incremental_decoding_with_a_kv_cache_matches_the_full_forward(shared):
    config = replace(CONFIG, attention_experts=AttentionExpertsConfig(3, shared_kv=shared))
    model = LanguageModel(config).double().eval()
    with torch.no_grad():
        full = model(IDS).logits
        cache = model.new_cache(32)
        steps = [model(IDS[:, :5], cache=cache).logits] + [
            model(IDS[:, t : t + 1], cache=cache).logits for t in range(5, 12)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-12)
    # shared K/V: one expert's worth of cached heads (the point of BAM's KV sharing)
    assert cache.layers[0].keys.shape[1] == config.kv_heads * (1 if shared else 3)


def test_attention_routings_are_recorded_trained_and_overridable():
    config = replace(CONFIG, attention_experts=AttentionExpertsConfig(3, top_k=2))
    model = LanguageModel(config).double()
    out = model(IDS)
    assert len(out.attention_routings) == 2 and out.routings == []
    assert out.attention_routings[0].logits.shape == (IDS.numel(), 3)
    out.logits.square().mean().backward()
    assert model.blocks[0].attn.router.weight.grad.abs().sum() > 0
    with torch.no_grad(), override_attention_routing(model, {1: RoutingOverride(force=[2], top_k=1)}):
        forced = model(IDS)
    assert forced.attention_routings[1].top1_expert().eq(2).all()
    assert not forced.attention_routings[0].top1_expert().eq(2).all()  # layer 0 untouched
    assert model.blocks[1].attn.routing_override is None  # restored
    assert (forced.logits - out.logits.detach()).abs().max() > 1e-6
    dense = LanguageModel(CONFIG)
    with pytest.raises(MoekitError, match="attention experts"), override_attention_routing(dense, None):
        pass
    with (
        pytest.raises(ConfigError, match="overrides"),
        override_attention_routing(model, {5: RoutingOverride()}),
    ):
        pass


def test_parallel_block_is_x_plus_attention_plus_ffn_of_the_same_input():
    config = replace(CONFIG, parallel_block=True)
    model = LanguageModel(config).double().eval()
    block = model.blocks[0]
    x, cos, sin = _inputs(config, seq=12)
    got, _, _ = block(x, cos, sin, None, None)
    want = x + block.attn(block.attn_norm(x), cos, sin, None) + block.ffn(block.ffn_norm(x))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    sequential = LanguageModel(CONFIG).double().eval()
    sequential.load_state_dict(model.state_dict())
    assert (sequential(IDS).logits - model(IDS).logits).abs().max() > 1e-4
    assert LMConfig.from_dict(config.to_dict()) == config


def _branches(n, parts=(".attn.", ".ffn."), config=CONFIG):
    """`n` float64 branches of one seed whose tensors under `parts` differ (norms, embeddings not)."""
    torch.manual_seed(0)
    seed = LanguageModel(config).double().eval()
    out = []
    for i in range(n):
        model = LanguageModel(config).double().eval()
        model.load_state_dict(seed.state_dict())
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(part in name for part in parts):
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
        out.append(model)
    return seed, out


def _forced(moe, e):
    force = RoutingOverride(force=[e], top_k=1)
    with torch.no_grad(), override_routing(moe, force), override_attention_routing(moe, force):
        return moe(IDS).logits


@pytest.mark.parametrize("top_k, config", [(0, CONFIG), (2, CONFIG), (0, QWEN3_LIKE)])
def test_mix_with_attention_experts_a_forced_expert_reproduces_its_branch(top_k, config):
    """The step-0 check of FFN experts, for attention too: branches differing in attention and FFN
    are reproduced exactly by the BAM mix (float64) and not by BTX's averaged attention; also with
    biases, query/key norms and a head size of its own (Qwen3's attention)."""
    seed, branches = _branches(3, config=config)
    options = MixOptions(router="random", top_k=2, attention="experts", attention_top_k=top_k)
    moe, provenance = mix_lm(branches, options, public=seed)
    assert moe.config.attention_experts == AttentionExpertsConfig(4, top_k=top_k)
    for e, source in enumerate([seed, *branches]):
        torch.testing.assert_close(_forced(moe, e), source(IDS).logits, rtol=0, atol=1e-10)
    assert "attention of public" in provenance["blocks.0.attn.experts.*"]
    btx, _ = mix_lm(branches, MixOptions(router="random", top_k=2))
    with torch.no_grad(), override_routing(btx, RoutingOverride(force=[1], top_k=1)):
        assert (btx(IDS).logits - branches[1](IDS).logits).abs().max() > 1e-4


def test_mix_with_shared_kv_averages_keys_and_values():
    _, branches = _branches(2, parts=(".q_proj.", ".o_proj.", ".ffn."))  # the branches share K/V
    moe, _ = mix_lm(branches, MixOptions(attention="shared_kv"))
    attn = moe.blocks[1].attn
    assert attn.spec.shared_kv and not hasattr(attn.experts[0], "k_proj")
    assert torch.equal(attn.experts[1].q_proj.weight, branches[1].blocks[1].attn.q_proj.weight)
    for e in range(2):  # K/V identical across branches: a forced expert is its branch
        torch.testing.assert_close(_forced(moe, e), branches[e](IDS).logits, rtol=0, atol=1e-10)
    _, differing = _branches(2)
    moe, _ = mix_lm(differing, MixOptions(attention="shared_kv"))
    want = (differing[0].blocks[0].attn.v_proj.weight + differing[1].blocks[0].attn.v_proj.weight) / 2
    torch.testing.assert_close(moe.blocks[0].attn.v_proj.weight, want, rtol=0, atol=1e-15)


def test_mix_into_parallel_blocks_keeps_parallel_branches_exact():
    config = replace(CONFIG, parallel_block=True)
    _, branches = _branches(2, config=config)
    moe, _ = mix_lm(branches, MixOptions(attention="experts"))
    assert moe.config.parallel_block
    for e in range(2):
        torch.testing.assert_close(_forced(moe, e), branches[e](IDS).logits, rtol=0, atol=1e-10)
    _, sequential = _branches(2)
    moe, _ = mix_lm(sequential, MixOptions(attention="experts", parallel=True))
    assert moe.config.parallel_block  # another function than the sequential branches
    assert (_forced(moe, 0) - sequential[0](IDS).logits).abs().max() > 1e-4


@pytest.mark.parametrize("attention, top_k", [("experts", 0), ("experts", 2), ("shared_kv", 0)])
def test_opt_out_of_a_bam_model_removes_ffn_and_attention_expert_as_masking_does(attention, top_k):
    seed, branches = _branches(3, config=QWEN3_LIKE if attention == "shared_kv" else CONFIG)
    moe, _ = mix_lm(branches, MixOptions(attention=attention, attention_top_k=top_k, top_k=2), public=seed)
    for j in (0, 2):
        smaller = remove_expert(moe, j)
        assert smaller.config.attention_experts.num_experts == 3
        keep = [e for e in range(4) if e != j]
        for e_new, e_old in enumerate(keep):
            assert torch.equal(smaller.blocks[0].attn.experts[e_new].q_proj.weight,
                               moe.blocks[0].attn.experts[e_old].q_proj.weight)  # fmt: skip
        assert torch.equal(smaller.blocks[1].attn.router.weight, moe.blocks[1].attn.router.weight[keep])
        attention_k = (top_k or 4) - (0 if top_k else 1)  # soft: every expert left
        mask = RoutingOverride(mask=[j])
        with (
            torch.no_grad(),
            override_routing(moe, mask),
            override_attention_routing(moe, RoutingOverride(mask=[j], top_k=attention_k)),
        ):
            masked = moe(IDS).logits
        with torch.no_grad():
            torch.testing.assert_close(smaller(IDS).logits, masked, rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="attention experts"):
        add_expert(moe, [], [], [])


@pytest.mark.parametrize("attention", ["experts", "shared_kv"])
def test_opt_in_of_a_removed_bam_expert_restores_the_model_bit_for_bit(attention):
    seed, branches = _branches(2, config=QWEN3_LIKE)
    moe, _ = mix_lm(branches, MixOptions(attention=attention), public=seed)
    last = moe.config.moe.router.num_experts - 1
    back = add_expert(
        remove_expert(moe, last),
        [b.ffn.experts.w_in[last] for b in moe.blocks],
        [b.ffn.experts.w_out[last] for b in moe.blocks],
        [b.ffn.router.weight[last] for b in moe.blocks],
        attention=[b.attn.experts[last].state_dict() for b in moe.blocks],
        attention_router_rows=[b.attn.router.weight[last] for b in moe.blocks],
    )
    assert back.config == moe.config
    for name, tensor in moe.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    with pytest.raises(ConfigError, match="q_proj"):
        add_expert(
            moe,
            [b.ffn.experts.w_in[0] for b in moe.blocks],
            [b.ffn.experts.w_out[0] for b in moe.blocks],
            [b.ffn.router.weight[0] for b in moe.blocks],
            attention=[{}, {}],
            attention_router_rows=[b.attn.router.weight[0] for b in moe.blocks],
        )


@pytest.mark.parametrize(
    "variant, field",
    [
        ({"attention": "moa"}, "variants[0].attention"),
        ({"attention_top_k": 2}, "variants[0].attention_top_k"),
        ({"attention": "experts", "attention_top_k": -1}, "variants[0].attention_top_k"),
        ({"parallel": "yes"}, "variants[0].parallel"),
    ],
)
def test_recipe_bam_options_are_checked_naming_the_field(variant, field):
    recipe = {
        "domains": ["code", "math"],
        "seed": {
            "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "ff_size": 64, "max_seq_len": 32}
        },
        "variants": [{"name": "bam", "router": "random", **variant}],
    }
    with pytest.raises(ConfigError) as info:
        BuildRecipe.from_dict(recipe)
    assert info.value.field == field
    good = {
        **recipe,
        "variants": [{"name": "bam", "attention": "shared_kv", "attention_top_k": 1, "parallel": True}],
    }
    assert BuildRecipe.from_dict(good).variants[0].options.attention == "shared_kv"


def test_hf_export_refuses_attention_experts_and_parallel_blocks_in_one_line():
    from moekit.interop.lm_hf import hf_family_of

    _, branches = _branches(2)
    for options, field in ((MixOptions(attention="experts"), "model.attention_experts"),
                           (MixOptions(parallel=True), "model.parallel_block")):  # fmt: skip
        moe, _ = mix_lm(branches, options)
        with pytest.raises(ConfigError) as info:
            hf_family_of(moe.config)
        assert info.value.field == field and "no HF family" in str(info.value) and "\n" not in str(info.value)


def test_attention_experts_config_is_checked():
    with pytest.raises(ConfigError, match="top_k"):
        AttentionExpertsConfig(2, top_k=3)
    with pytest.raises(ConfigError, match="model.attention_experts.colour"):
        LMConfig.from_dict({**CONFIG.to_dict(), "attention_experts": {"num_experts": 2, "colour": 1}})
    config = LMConfig.from_dict(
        {**CONFIG.to_dict(), "attention_experts": {"num_experts": 2, "shared_kv": True}}
    )
    assert config.attention_experts == AttentionExpertsConfig(2, shared_kv=True)
    assert LMConfig.from_dict(config.to_dict()) == config


def test_convert_to_hf_of_a_bam_run_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    from moekit.cli import main as moekit_main
    from moekit.train.checkpoint import save_checkpoint

    _, branches = _branches(2)
    moe, _ = mix_lm(branches, MixOptions(attention="shared_kv"))
    run = tmp_path / "bam"
    save_checkpoint(
        run / "checkpoints" / "step-000000", moe, None, {"config": {"model": moe.config.to_dict()}}
    )
    assert moekit_main(["convert", "to-hf", str(run), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.attention_experts" in err and "no HF family" in err
    assert not (tmp_path / "hf").exists()


def test_bam_claim_verdicts_follow_the_losses():
    from moekit.domains.build import bam_claim

    recipe = BuildRecipe.from_dict(
        {
            "domains": ["code", "math"],
            "seed": {
                "model": {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "ff_size": 8, "max_seq_len": 8}
            },
            "variants": [{"name": "btx"}],
        }  # fmt: skip
    )

    def moe(attention, code, math, experts=("code", "math")):
        losses = {"code": code, "math": math, "mean": (code + math) / 2}
        return {
            "kind": "moe",
            "attention": attention,
            "experts": list(experts),
            "step0": losses,
            "post": losses,
        }

    def verdict(**models):
        return bam_claim(models, recipe)["bam_full_attention_experts_le_btx"]["verdict"]

    btx = moe("average", 3.0, 2.0)
    assert verdict(btx=btx, bam=moe("experts", 2.9, 1.9)) == "reproduced"
    assert verdict(btx=btx, bam=moe("experts", 2.5, 2.1)) == "partly reproduced (mean only)"
    assert verdict(btx=btx, bam=moe("experts", 3.1, 2.0)) == "not reproduced at this scale"
    # a public-expert (FlexOlmo) BTX is not the comparison: the claim is then not measured
    public = moe("average", 1.0, 1.0, experts=("public", "code", "math"))
    assert verdict(flex=public, bam=moe("experts", 2.9, 1.9)).startswith("not measured")
    claim = bam_claim(
        {"btx": btx, "kv": moe("shared_kv", 2.95, 1.95), "bam": moe("experts", 2.9, 1.9)}, recipe
    )
    assert claim["bam_full_attention_experts_le_btx"]["order_full_le_kv_le_btx"]
