"""moekit's own language model (`models.lm`) to and from the HF family that computes the same thing.

The LM is a Llama-style decoder (RMSNorm, half-split RoPE, GQA, SwiGLU), so:
- dense -> Llama (q/k/v/o biases: `attention_bias: all`); with Qwen2's q/k/v biases
  (`attention_bias: qkv`) -> Qwen2; with Qwen3's query/key norms (`qk_norm`) -> Qwen3;
- MoE with `qk_norm`, no shared expert -> Qwen3-MoE; with q/k/v biases -> Qwen2-MoE (qkv_bias);
- MoE in every layer, softmax top-k renormalised, no shared expert -> Mixtral;
- otherwise (dense first layers, `moe_every`, top-k not renormalised, shared experts) ->
  Qwen2-MoE without qkv biases: `mlp_only_layers` holds the dense layers, `norm_topk_prob` the
  renormalisation, and moekit's ungated shared expert becomes Qwen2-MoE's gated one with a zero
  gate (sigmoid 0.5) and a doubled down projection (exact in binary floating point).
Configs with no HF family (the checks in `hf_family_of` name the field): attention experts and
parallel blocks (BAM; no transformers model routes attention per token), routers other than
softmax token choice (sigmoid, groups, selection bias, after-top-k scoring, capacity, expert
choice, hash, ...), experts other than packed SwiGLU (latent, LoRA, biases, other activations).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.errors import ConfigError, MoekitError
from moekit.models.lm import LanguageModel, LMConfig

LM_FAMILIES = ("llama", "mixtral", "qwen2_moe", "qwen2", "qwen3", "qwen3_moe")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MoekitError("exporting to HF needs transformers: pip install 'moekit[hf]'") from None
    return transformers


def hf_family_of(config: LMConfig) -> str:
    """The HF family that computes `config`'s model, or a ConfigError naming what has none."""
    if config.attention_experts is not None:
        raise ConfigError(
            "model.attention_experts",
            "attention experts (BAM) have no HF family: no transformers model routes attention per token",
        )
    if config.parallel_block:
        raise ConfigError(
            "model.parallel_block",
            "parallel attention+FFN blocks have no HF family moekit writes (Llama, Mixtral, Qwen2-MoE)",
        )
    if config.moe is None:
        return dense_family_of(config)
    moe, spec = config.moe, config.moe.router
    checks = [
        ("router_kind", moe.router_kind, "token_choice"),
        ("experts_kind", moe.experts_kind, "packed"),
        ("activation", moe.activation, "swiglu"),
        ("expert_bias", moe.expert_bias, False),
        ("router.score_fn", spec.score_fn, "softmax"),
        ("router.score_timing", spec.score_timing, "before_topk"),
        ("router.selection_bias", spec.selection_bias, False),
        ("router.num_groups", spec.num_groups, 1),
        ("router.renorm_eps", spec.renorm_eps, 0.0),
        ("router.scaling", spec.scaling, 1.0),
        ("router.weight_on", spec.weight_on, "output"),
        ("router.router_bias", spec.router_bias, False),
        ("router.negative_bias", spec.negative_bias, False),
        ("router.capacity_factor", spec.capacity_factor, None),
    ]
    for name, value, wanted in checks:
        if value != wanted:
            raise ConfigError(
                f"model.moe.{name}", f"got {value!r}; only {wanted!r} has an HF family (Mixtral / Qwen2-MoE)"
            )
    if spec.renorm not in ("none", "sum"):
        raise ConfigError(
            "model.moe.router.renorm", f"got {spec.renorm!r}; HF families renormalise by 'sum' or not"
        )
    if config.qk_norm:  # Qwen3 attention: Qwen3-MoE (no shared experts)
        if moe.num_shared_experts:
            raise ConfigError(
                "model.moe.num_shared_experts", "Qwen3-MoE (the HF family with query/key norms) has none"
            )
        return "qwen3_moe"
    if config.attention_bias == "all":
        raise ConfigError(
            "model.attention_bias",
            "'all' has an HF MoE family only with qk_norm (Qwen3-MoE); use none or qkv",
        )
    all_moe = all(config.is_moe_layer(i) for i in range(config.num_layers))
    if config.attention_bias == "none" and all_moe and spec.renorm == "sum" and not moe.num_shared_experts:
        return "mixtral"
    _require_plain_heads(config, "qwen2_moe")
    return "qwen2_moe"


def dense_family_of(config: LMConfig) -> str:
    """Llama (optionally with q/k/v/o biases), Qwen2 (q/k/v biases) or Qwen3 (query/key norms)."""
    if config.qk_norm:
        return "qwen3"
    if config.attention_bias == "qkv":
        _require_plain_heads(config, "qwen2")
        return "qwen2"
    return "llama"


def _require_plain_heads(config: LMConfig, family: str) -> None:
    if config.attention_head_dim not in (None, config.hidden_size // config.num_heads):
        raise ConfigError(
            "model.attention_head_dim",
            f"got {config.attention_head_dim}; {family} heads are hidden_size / num_heads",
        )


def hf_config_of(config: LMConfig) -> Any:
    transformers = _transformers()
    family = hf_family_of(config)
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        initializer_range=config.init_std,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if family == "llama":
        return transformers.LlamaConfig(
            **common,
            intermediate_size=config.ff_size,
            head_dim=config.head_dim,
            attention_bias=config.attention_bias == "all",
        )
    if family == "qwen2":
        return transformers.Qwen2Config(**common, intermediate_size=config.ff_size, use_sliding_window=False)
    if family == "qwen3":
        return transformers.Qwen3Config(
            **common,
            intermediate_size=config.ff_size,
            head_dim=config.head_dim,
            attention_bias=config.attention_bias == "all",
            use_sliding_window=False,
        )
    moe = config.moe
    assert moe is not None
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common,
            head_dim=config.head_dim,
            attention_bias=config.attention_bias == "all",
            intermediate_size=config.ff_size,
            moe_intermediate_size=moe.ff_size,
            num_experts=moe.router.num_experts,
            num_experts_per_tok=moe.router.top_k,
            norm_topk_prob=moe.router.renorm == "sum",
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(config.num_layers) if not config.is_moe_layer(i)],
            use_sliding_window=False,
        )
    if family == "mixtral":
        return transformers.MixtralConfig(
            **common,
            head_dim=config.head_dim,
            intermediate_size=moe.ff_size,
            num_local_experts=moe.router.num_experts,
            num_experts_per_tok=moe.router.top_k,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    return transformers.Qwen2MoeConfig(
        **common,
        intermediate_size=config.ff_size,
        moe_intermediate_size=moe.ff_size,
        shared_expert_intermediate_size=moe.shared_total_ff,
        num_experts=moe.router.num_experts,
        num_experts_per_tok=moe.router.top_k,
        norm_topk_prob=moe.router.renorm == "sum",
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(config.num_layers) if not config.is_moe_layer(i)],
        qkv_bias=config.attention_bias == "qkv",
        use_sliding_window=False,
    )


def hf_state_of(model: LanguageModel, family: str) -> dict[str, Tensor]:
    """The HF model's in-memory parameter names (transformers v5) -> tensors of `model`."""
    out: dict[str, Tensor] = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.norm.weight,
    }
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = model.head.weight
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}self_attn.{name}.weight"] = getattr(block.attn, name).weight
            if getattr(block.attn, name).bias is not None:
                out[f"{p}self_attn.{name}.bias"] = getattr(block.attn, name).bias
        if model.config.qk_norm:
            out[f"{p}self_attn.q_norm.weight"] = block.attn.q_norm.weight
            out[f"{p}self_attn.k_norm.weight"] = block.attn.k_norm.weight
        ffn = block.ffn
        if not block.is_moe:
            gate, up = ffn.proj_in.weight.chunk(2, dim=0)
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            out[p + "mlp.down_proj.weight"] = ffn.proj_out.weight
            continue
        out[p + "mlp.gate.weight"] = ffn.router.weight
        out[p + "mlp.experts.gate_up_proj"] = ffn.experts.w_in
        out[p + "mlp.experts.down_proj"] = ffn.experts.w_out
        if family != "qwen2_moe":
            continue
        shared = ffn.shared
        h = model.config.hidden_size
        if shared is None:  # a zero-size shared expert (Qwen2-MoE always has one)
            dtype = ffn.router.weight.dtype
            out[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, h, dtype=dtype)
            for name, shape in (("gate_proj", (0, h)), ("up_proj", (0, h)), ("down_proj", (h, 0))):
                out[f"{p}mlp.shared_expert.{name}.weight"] = torch.zeros(shape, dtype=dtype)
            continue
        gate, up = shared.proj_in.weight.chunk(2, dim=0)
        out[p + "mlp.shared_expert.gate_proj.weight"], out[p + "mlp.shared_expert.up_proj.weight"] = gate, up
        if shared.gate is not None:
            out[p + "mlp.shared_expert_gate.weight"] = shared.gate.weight
            out[p + "mlp.shared_expert.down_proj.weight"] = shared.proj_out.weight
        else:
            out[p + "mlp.shared_expert_gate.weight"] = torch.zeros(1, h, dtype=shared.proj_out.weight.dtype)
            out[p + "mlp.shared_expert.down_proj.weight"] = shared.proj_out.weight * 2
    return out


@torch.no_grad()
def lm_to_hf_model(model: LanguageModel) -> Any:
    """A transformers model (eval mode, the LM's dtype) holding exactly `model`'s function."""
    transformers = _transformers()
    config = hf_config_of(model.config)
    family = hf_family_of(model.config)
    dtype = model.embed.weight.dtype
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager")
    params = dict(hf.named_parameters())
    state = hf_state_of(model, family)
    missing = sorted(
        set(params) - set(state) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
    )
    if missing:
        raise MoekitError(f"export to {family}: no moekit tensor for {', '.join(missing[:4])}")
    for name, tensor in state.items():
        if name not in params:
            raise MoekitError(f"export to {family}: {name} is not a parameter of {type(hf).__name__}")
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise MoekitError(
                f"export to {family}: {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(params[name].shape)}"
            )
        params[name].copy_(tensor)
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def lm_to_hf(model: LanguageModel, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `model` as an HF folder (`save_pretrained`, safetensors) that
    `AutoModelForCausalLM.from_pretrained` loads without remote code; atomic."""
    from moekit.interop.hf import _write_dir

    hf = lm_to_hf_model(model)
    return _write_dir(
        Path(path), lambda tmp: hf.save_pretrained(str(tmp), safe_serialization=True), overwrite
    )


# -- HF -> moekit ----------------------------------------------------------------------------


def lm_config_from_hf(config: Any, source: str) -> LMConfig:
    """The LMConfig of an HF Llama / Qwen2 / Qwen3 / Mixtral / Qwen2-MoE / Qwen3-MoE config that
    moekit's LM can compute."""
    from moekit.layer import MoEConfig
    from moekit.routing.spec import RouterSpec

    family = getattr(config, "model_type", None)
    if family not in LM_FAMILIES:
        raise MoekitError(
            f"{source}: model_type {family!r} has no moekit LM counterpart "
            f"(expected one of {', '.join(LM_FAMILIES)}; "
            "other families load with moekit.from_hf)"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    problems = [
        (head_dim % 2 == 1, f"head_dim={head_dim} (RoPE needs an even head size)"),
        (rope.get("rope_type", "default") != "default", f"rope_type={rope.get('rope_type')!r}"),
        (getattr(config, "mlp_bias", False), "MLP biases"),
        (config.hidden_act != "silu", f"hidden_act={config.hidden_act!r}"),
        (getattr(config, "sliding_window", None) is not None and family == "mixtral", "a sliding window"),
        (getattr(config, "use_sliding_window", False), "a sliding window"),
    ]
    for bad, what in problems:
        if bad:
            raise MoekitError(f"{source}: {what} has no counterpart in moekit's LM")
    values: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=config.num_key_value_heads,
        ff_size=config.intermediate_size,
        max_seq_len=config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm_eps=config.rms_norm_eps,
        tie_embeddings=bool(config.tie_word_embeddings),
        init_std=float(getattr(config, "initializer_range", 0.02)),
        attention_head_dim=None if head_dim * heads == config.hidden_size else head_dim,
        attention_bias=_attention_bias(config, family),
        qk_norm=family in ("qwen3", "qwen3_moe"),
    )
    if family in ("llama", "qwen2", "qwen3"):
        return LMConfig(**values)
    h = config.hidden_size
    if family == "mixtral":
        spec = RouterSpec(
            num_experts=config.num_local_experts, top_k=config.num_experts_per_tok, renorm="sum"
        )
        return LMConfig(**values, moe=MoEConfig(hidden_size=h, ff_size=config.intermediate_size, router=spec))
    dense_layers = set(config.mlp_only_layers or [])
    step = config.decoder_sparse_step
    n = config.num_hidden_layers
    pattern = [i not in dense_layers and (i + 1) % step == 0 for i in range(n)]
    moe_layers = [i for i, m in enumerate(pattern) if m]
    if not moe_layers:
        raise MoekitError(f"{source}: no MoE layer (every layer is in mlp_only_layers)")
    first = moe_layers[0]
    every = moe_layers[1] - first if len(moe_layers) > 1 else 1
    if pattern != [i >= first and (i - first) % every == 0 for i in range(n)]:
        raise MoekitError(
            f"{source}: MoE layers {moe_layers} are not 'the first k dense, then every m-th' (moekit's LM)"
        )
    shared = getattr(config, "shared_expert_intermediate_size", 0)  # Qwen3-MoE: none
    spec = RouterSpec(
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        renorm="sum" if config.norm_topk_prob else "none",
    )
    moe = MoEConfig(
        hidden_size=h,
        ff_size=config.moe_intermediate_size,
        router=spec,
        num_shared_experts=1 if shared else 0,
        shared_ff_size=shared or None,
        shared_gate=bool(shared),
    )
    return LMConfig(**values, moe=moe, first_dense_layers=first, moe_every=every)


def _attention_bias(config: Any, family: str) -> str:
    """Qwen2 and Qwen2-MoE bias queries, keys and values; Llama's and Qwen3's `attention_bias` the
    output too."""
    if family == "qwen2":
        return "qkv"  # always, in transformers' Qwen2 attention
    if family == "qwen2_moe":
        return "qkv" if getattr(config, "qkv_bias", False) else "none"
    return "all" if getattr(config, "attention_bias", False) else "none"


@torch.no_grad()
def lm_from_hf(path: str | os.PathLike) -> LanguageModel:
    """moekit's LM holding an HF folder of a family in `LM_FAMILIES` (loaded by transformers)."""
    transformers = _transformers()
    path = Path(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, dtype="auto", experts_implementation="eager", use_safetensors=True
    )
    config = lm_config_from_hf(hf.config, str(path / "config.json"))
    with torch.device("meta"):
        model = LanguageModel(config)
    model = model.to_empty(device="cpu").to(hf.dtype)
    family = hf.config.model_type
    params = dict(hf.named_parameters())
    for name, ours in hf_state_of(model, family).items():
        if name.endswith("shared_expert_gate.weight") and not config.moe.num_shared_experts:
            continue  # a zero-size shared expert: nothing to hold
        ours.copy_(params[name])  # views into the fused moekit tensors fill them in place
    if config.tie_embeddings:
        model.head.weight = model.embed.weight
    return model.eval()
