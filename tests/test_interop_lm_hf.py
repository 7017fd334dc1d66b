"""moekit's LM exported to Llama / Mixtral / Qwen2-MoE: transformers computes the same logits
(float64), and reading the folder back gives the same model."""

import pytest
import torch

pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
import transformers  # noqa: E402

from moekit.errors import ConfigError  # noqa: E402
from moekit.interop.lm_hf import hf_family_of, lm_from_hf, lm_to_hf  # noqa: E402
from moekit.layer import MoEConfig  # noqa: E402
from moekit.models.lm import LanguageModel, LMConfig  # noqa: E402
from moekit.routing.spec import RouterSpec  # noqa: E402

BASE = dict(
    vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, ff_size=48, max_seq_len=32,
    tie_embeddings=False, rope_theta=5000.0, norm_eps=1e-5,
)  # fmt: skip


def moe(renorm="sum", **kw):
    return MoEConfig(
        hidden_size=32, ff_size=16, router=RouterSpec(num_experts=4, top_k=2, renorm=renorm), **kw
    )


CONFIGS = {
    "llama": LMConfig(**BASE),
    "mixtral": LMConfig(**BASE, moe=moe()),
    "qwen2_moe-shared-first-dense": LMConfig(
        **{**BASE, "tie_embeddings": True},
        first_dense_layers=1,
        moe=moe("none", num_shared_experts=1, shared_ff_size=24),
    ),
    "qwen2_moe-gated-every-2": LMConfig(
        **BASE, moe_every=2, moe=moe(num_shared_experts=1, shared_ff_size=24, shared_gate=True)
    ),
    "llama-attention-biases": LMConfig(**BASE, attention_bias="all", attention_head_dim=16),
    "qwen2": LMConfig(**BASE, attention_bias="qkv"),
    "qwen3": LMConfig(**BASE, qk_norm=True, attention_head_dim=12, attention_bias="all"),
    "qwen2_moe-qkv-bias": LMConfig(**BASE, attention_bias="qkv", moe=moe()),
    "qwen3_moe-first-dense": LMConfig(
        **BASE, qk_norm=True, attention_head_dim=12, first_dense_layers=1, moe=moe("none")
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_lm_computes_the_same_logits_in_transformers(tmp_path, name):
    config = CONFIGS[name]
    assert hf_family_of(config) == name.split("-")[0]
    model = LanguageModel(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
            else:
                p.mul_(20)  # well away from a near-zero function
    folder = lm_to_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float64, experts_implementation="eager"
    ).eval()
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        # RoPE tables and HF routing weights are computed in fp32 (relative error ~1e-6)
        scale = want.abs().max()
        assert (hf(ids).logits - want).abs().max() / scale < 1e-5
        back = lm_from_hf(folder)
        torch.testing.assert_close(back(ids).logits, want, rtol=0, atol=0)
    assert back.config.num_layers == config.num_layers and back.config.moe_every == config.moe_every


def test_configs_without_an_hf_family_name_the_field():
    sigmoid = MoEConfig(
        hidden_size=32, ff_size=16, router=RouterSpec(num_experts=4, top_k=2, score_fn="sigmoid")
    )
    with pytest.raises(ConfigError, match="model.moe.router.score_fn"):
        hf_family_of(LMConfig(**BASE, moe=sigmoid))
    with pytest.raises(ConfigError, match="model.attention_head_dim"):
        hf_family_of(LMConfig(**BASE, attention_bias="qkv", attention_head_dim=16))
    with pytest.raises(ConfigError, match="model.attention_bias"):
        hf_family_of(LMConfig(**BASE, attention_bias="all", moe=moe()))
    with pytest.raises(ConfigError, match="model.moe.num_shared_experts"):
        hf_family_of(LMConfig(**BASE, qk_norm=True, moe=moe(num_shared_experts=1)))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_hf_qwen_dense_folders_load_into_moekits_lm_exactly(tmp_path, family):
    from moekit.interop.tiny import tiny_dense_model

    hf = tiny_dense_model(family, seed=3).double()  # Qwen3: head_dim 16 x 4 heads != hidden 32, o bias
    hf.save_pretrained(tmp_path / family)
    ours = lm_from_hf(tmp_path / family).double()
    assert ours.config.qk_norm == (family == "qwen3")
    assert ours.config.attention_bias == ("qkv" if family == "qwen2" else "all")
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        assert (ours(ids).logits - want).abs().max() / want.abs().max() < 1e-5  # fp32 RoPE tables in HF


def test_qwen_attention_parts_start_as_hf_starts_them():
    """Biases at zero, query/key norms at one (then trained or loaded)."""
    model = LanguageModel(LMConfig(**BASE, attention_bias="all", qk_norm=True, attention_head_dim=12))
    attn = model.blocks[1].attn
    assert attn.q_proj.weight.shape == (48, 32) and attn.o_proj.weight.shape == (32, 48)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert getattr(attn, name).bias is not None and not getattr(attn, name).bias.any()
    assert attn.q_norm.weight.eq(1).all() and attn.k_norm.weight.shape == (12,)
    assert LanguageModel(LMConfig(**BASE, attention_bias="qkv")).blocks[0].attn.o_proj.bias is None
