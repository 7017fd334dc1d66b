"""Tiny random transformers models of every supported family, built offline (tests, benchmarks).

The configs switch on what distinguishes each family (sliding windows shorter than a test
sequence, QK-norm, QKV clipping, YaRN, group-limited routing, dense layers, multipliers, clamped
SwiGLU ...), and `randomize_` gives every tensor a non-trivial value (norm weights, biases, sinks
and the selection bias included), so that a mis-mapped tensor cannot go unnoticed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moekit.errors import MoekitError
from moekit.interop.families import FAMILIES

_COMMON = dict(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        _COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6
    ),
    "qwen2_moe": dict(
        _COMMON,
        num_hidden_layers=3,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        use_sliding_window=True,
        sliding_window=5,
        max_window_layers=3,
    ),
    "qwen3_moe": dict(
        _COMMON,
        head_dim=16,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        attention_bias=True,
    ),
    "olmoe": dict(
        _COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2, clip_qkv=0.8, eos_token_id=2
    ),
    "deepseek_v3": dict(
        _COMMON,
        num_key_value_heads=4,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        n_shared_experts=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=256,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=4.0,
            original_max_position_embeddings=64,
            mscale=1.0,
            mscale_all_dim=1.0,
            beta_fast=32,
            beta_slow=1,
        ),
    ),
    "gpt_oss": dict(
        _COMMON,
        head_dim=8,
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        swiglu_limit=1.5,
    ),
    "granitemoe": dict(
        _COMMON,
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        attention_bias=True,
        embedding_multiplier=2.0,
        attention_multiplier=0.25,
        residual_multiplier=0.5,
        logits_scaling=2.0,
    ),
    "llama4_text": dict(
        _COMMON,
        num_hidden_layers=4,  # layers 1 and 3 MoE; layer 3 without RoPE
        head_dim=8,
        intermediate_size=16,
        intermediate_size_mlp=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        interleave_moe_layer_step=2,
        attention_chunk_size=5,
        floor_scale=4,
        attn_scale=0.3,
        attention_bias=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "dbrx": dict(
        vocab_size=128,
        d_model=32,
        n_layers=2,
        n_heads=4,
        attn_config=dict(kv_n_heads=2, clip_qkv=0.8, rope_theta=10000.0),
        ffn_config=dict(moe_num_experts=4, moe_top_k=2, ffn_hidden_size=16, moe_normalize_expert_weights=2.0),
    ),
}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MoekitError("tiny HF models need transformers: pip install 'moekit[hf]'") from None
    return transformers


def tiny_config(family: str, **overrides: Any) -> Any:
    """The transformers config of a tiny `family` model (`overrides` replace fields)."""
    if family not in TINY_CONFIGS:
        raise MoekitError(f"no tiny config for {family!r}; families: {', '.join(TINY_CONFIGS)}")
    cls = getattr(_transformers(), FAMILIES[family].config_class)
    return cls(**{**TINY_CONFIGS[family], **overrides})


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter (and the selection-bias buffer) a distinct, well-scaled random value."""
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64).mul_(std).add_(mean).to(t.dtype))

    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() >= 2:
            normal(p, 1.0 if "embed" in name or name.endswith("wte.weight") else p.shape[-1] ** -0.5)
        elif name.endswith("weight"):
            normal(p, 0.2, mean=1.0)
        else:
            normal(p, 0.2)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            normal(b, 0.2)
    return model


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny randomized transformers causal LM of `family`, in eval mode."""
    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    return randomize_(model, seed).eval()


# Dense families `moekit upcycle` reads (HF dense in, HF MoE out); intermediate sizes divide by 2,
# 4 and 8 so that every split recipe has a test.
TINY_DENSE_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(_COMMON, intermediate_size=32, head_dim=8)),
    "mistral": ("MistralConfig", dict(_COMMON, intermediate_size=32, sliding_window=6)),
    "qwen2": ("Qwen2Config", dict(_COMMON, intermediate_size=32)),
    "qwen3": ("Qwen3Config", dict(_COMMON, intermediate_size=32, head_dim=16, attention_bias=True)),
    "olmo2": ("Olmo2Config", dict(_COMMON, intermediate_size=32, pad_token_id=1, eos_token_id=2)),
}


def tiny_dense_config(family: str, **overrides: Any) -> Any:
    """The transformers config of a tiny dense `family` model (`overrides` replace fields)."""
    if family not in TINY_DENSE_CONFIGS:
        raise MoekitError(f"no tiny dense config for {family!r}; families: {', '.join(TINY_DENSE_CONFIGS)}")
    class_name, values = TINY_DENSE_CONFIGS[family]
    return getattr(_transformers(), class_name)(**{**values, **overrides})


def tiny_dense_model(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny randomized transformers dense causal LM of `family`, in eval mode."""
    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_config(tiny_dense_config(family, **overrides))
    return randomize_(model, seed).eval()
