"""The HF families moekit imports: for each, how its config maps to a `FamilyConfig` and back,
and what its parameters are called on disk (both expert layouts) and in a live model.

One `FamilySpec` per family, read off transformers' modeling and conversion-mapping files; the
mapping engine is `interop.convert`, which only follows these tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moekit.errors import ConfigError, MoekitError
from moekit.interop.attention import AttentionConfig
from moekit.interop.model import FamilyConfig
from moekit.interop.rope import ROPE_KINDS, RopeConfig
from moekit.layer import MoEConfig
from moekit.routing.spec import RouterSpec, router_spec_from_dict

EXPERT_FORMATS = ("fused", "per_expert", "transposed", "gpt_oss", "dbrx")


@dataclass(frozen=True)
class ExpertNames:
    """How one layout stores a layer's routed experts, relative to the MoE block.

    - `fused`: `gate_up` [E, 2I, H] ([gate | up] rows) and `down` [E, H, I] (transformers v5).
    - `per_expert`: `experts.{e}.<gate>.weight` [I, H], `<up>` [I, H], `<down>` [H, I] (v4, and what
      `save_pretrained` writes by default).
    - `transposed`: `gate_up` [E, H, 2I] ([gate | up] columns) and `down` [E, I, H] (Llama 4).
    - `gpt_oss`: `gate_up` [E, H, 2I] transposed with gate/up interleaved, `down` [E, I, H], biases.
    - `dbrx`: `w1` (gate), `v1` (up), `w2` (down, transposed) as [E * I, H] each.
    """

    format: str
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.format not in EXPERT_FORMATS:
            raise ValueError(f"unknown expert format {self.format!r}")


@dataclass(frozen=True)
class MoENames:
    """A layer's MoE block: `prefix` relative to the layer, the rest relative to `prefix`."""

    prefix: str
    router: str  # the router's linear layer, e.g. "gate." (+ "weight", "bias")
    experts: ExpertNames
    selection_bias: str | None = None
    shared: str | None = None  # a gate/up/down MLP, e.g. "shared_expert."
    shared_gate: str | None = None  # e.g. "shared_expert_gate.weight"


@dataclass(frozen=True)
class PatchNames:
    """Where the MoE block and its parts live in a live transformers model (for `patch`)."""

    block_class: str
    router: str
    experts: str = "experts"
    shared: str | None = None
    shared_gate: str | None = None


@dataclass(frozen=True)
class HFNames:
    """Parameter names of one family's checkpoint; `layer` is formatted with the layer index."""

    moe: dict[str, MoENames]  # by layout: "packed" (v5) and "per_expert" (v4, save_pretrained default)
    embed: str = "model.embed_tokens.weight"
    norm: str = "model.norm.weight"
    head: str = "lm_head.weight"
    layer: str = "model.layers.{i}."
    attn_norm: str = "input_layernorm.weight"
    ffn_norm: str = "post_attention_layernorm.weight"
    attn: str = "self_attn."
    attn_renames: dict[str, str] = field(default_factory=dict)  # moekit name -> HF name
    dense: str = "mlp."  # dense FFN: gate_proj / up_proj / down_proj
    ignored: tuple[str, ...] = ()  # regexes of checkpoint keys transformers also drops


@dataclass(frozen=True)
class FamilySpec:
    name: str  # moekit's name, also the HF `model_type`
    architecture: str
    config_class: str
    names: HFNames
    read_config: Callable[[Any], dict[str, Any]]  # HF config object -> FamilyConfig fields
    write_config: Callable[[FamilyConfig], dict[str, Any]]  # FamilyConfig -> HF config fields
    patch: PatchNames | None = None
    patch_note: str = ""
    # HF config object -> the MoE block's `MoEConfig` alone: what `patch` reads, so that settings
    # it does not replace (attention, RoPE) never block it
    read_moe: Callable[[Any], MoEConfig] | None = None


# --- shared pieces of the config mappings -------------------------------------------------------


def _require_silu(activation: Any, field_name: str) -> None:
    if activation != "silu":
        raise ConfigError(
            field_name, f"got {activation!r}; moekit runs these experts as SwiGLU, expected 'silu'"
        )


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _read_rope(cfg: Any, dim: int, layout: str = "half") -> RopeConfig:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    kind = params.pop("rope_type", "default")
    if kind not in ROPE_KINDS:
        shown = ", ".join(ROPE_KINDS)
        raise ConfigError("rope_parameters.rope_type", f"got {kind!r}; moekit supports {shown}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(
            "rope_parameters.partial_rotary_factor", "partial rotary embeddings are not supported"
        )
    if "rope_theta" not in params:
        raise ConfigError("rope_parameters.rope_theta", "missing")
    theta = params.pop("rope_theta")
    return RopeConfig(dim, float(theta), kind, params, cfg.max_position_embeddings, layout)


def _write_rope(rope: RopeConfig) -> dict[str, Any]:
    return {"rope_parameters": {"rope_type": rope.kind, "rope_theta": rope.theta, **rope.params}}


def _common(cfg: Any, tie: bool | None = None) -> dict[str, Any]:
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        norm_eps=cfg.rms_norm_eps,
        tie_embeddings=bool(cfg.tie_word_embeddings if tie is None else tie),
    )


def _write_common(fc: FamilyConfig) -> dict[str, Any]:
    return dict(
        vocab_size=fc.vocab_size,
        hidden_size=fc.hidden_size,
        num_hidden_layers=fc.num_layers,
        rms_norm_eps=fc.norm_eps,
        tie_word_embeddings=fc.tie_embeddings,
        max_position_embeddings=fc.rope.max_position_embeddings,
        **_write_rope(fc.rope),
    )


def _gqa(cfg: Any, **options: Any) -> AttentionConfig:
    return AttentionConfig(
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=options.pop("head_dim", None) or _head_dim(cfg),
        **options,
    )


def _write_gqa(fc: FamilyConfig) -> dict[str, Any]:
    a = fc.attention
    out = dict(num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads)
    if a.head_dim != fc.hidden_size // a.num_heads or fc.hf_config.get("head_dim") is not None:
        out["head_dim"] = a.head_dim
    elif "head_dim" in fc.hf_config:  # the source's own spelling of the default (None)
        out["head_dim"] = None
    return out


def _router(preset: str, num_experts: int, top_k: int, **overrides: Any) -> RouterSpec:
    """A router preset with the axes this checkpoint's config sets differently."""
    return router_spec_from_dict(dict(preset=preset, num_experts=num_experts, top_k=top_k, **overrides))


def _as_int(value: float, field_name: str) -> int:
    """A float field moekit keeps that the HF config types as an integer."""
    if not float(value).is_integer():
        raise ConfigError(field_name, f"got {value}, the HF config needs an integer")
    return int(value)


def _renorm(norm_topk_prob: Any) -> str:
    return "sum" if norm_topk_prob else "none"


def _sparse_layers(cfg: Any, num_experts: int) -> tuple[bool, ...]:
    """Qwen's layer pattern: MoE unless listed in `mlp_only_layers`, every `decoder_sparse_step`-th."""
    only_mlp = set(cfg.mlp_only_layers or [])
    step = cfg.decoder_sparse_step
    return tuple(
        i not in only_mlp and num_experts > 0 and (i + 1) % step == 0 for i in range(cfg.num_hidden_layers)
    )


def _write_sparse_layers(fc: FamilyConfig) -> dict[str, Any]:
    return dict(decoder_sparse_step=1, mlp_only_layers=[i for i, moe in enumerate(fc.moe_layers) if not moe])


def _typed_windows(cfg: Any) -> tuple[int | None, ...]:
    return tuple(cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types)


def _write_typed_windows(fc: FamilyConfig) -> dict[str, Any]:
    sizes = {w for w in fc.windows if w is not None}
    if len(sizes) > 1:
        raise ConfigError("family.windows", f"{fc.family} has one sliding window size, got {sorted(sizes)}")
    return dict(
        sliding_window=sizes.pop() if sizes else None,
        layer_types=["full_attention" if w is None else "sliding_attention" for w in fc.windows],
    )


def _uniform_window(fc: FamilyConfig) -> int | None:
    if len(set(fc.windows)) > 1:
        raise ConfigError("family.windows", f"{fc.family} applies one sliding window to every layer")
    return fc.windows[0]


# --- expert names shared by several families ----------------------------------------------------

_FUSED = ExpertNames("fused", ("experts.gate_up_proj", "experts.down_proj"))
_PER_EXPERT = ExpertNames(
    "per_expert",
    ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight", "experts.{e}.down_proj.weight"),
)


def _qwen_moe(**extra: Any) -> dict[str, MoENames]:
    """The `mlp.gate` / `mlp.experts` block of Qwen-style families, in both layouts."""
    return {
        "packed": MoENames("mlp.", "gate.", _FUSED, **extra),
        "per_expert": MoENames("mlp.", "gate.", _PER_EXPERT, **extra),
    }


def _one_layout(names: MoENames) -> dict[str, MoENames]:
    """Families whose checkpoints have a single layout (save_pretrained writes it either way)."""
    return {"packed": names, "per_expert": names}


# --- per family: config fields both ways, then the table of parameter names --------------------


def _moe_mixtral(cfg: Any) -> MoEConfig:
    _require_silu(cfg.hidden_act, "hidden_act")
    spec = _router(
        "mixtral", cfg.num_local_experts, cfg.num_experts_per_tok, jitter_eps=cfg.router_jitter_noise
    )
    return MoEConfig(cfg.hidden_size, cfg.intermediate_size, spec)


def _read_mixtral(cfg: Any) -> dict[str, Any]:
    return dict(
        moe=_moe_mixtral(cfg),
        **_common(cfg),
        attention=_gqa(cfg),
        rope=_read_rope(cfg, _head_dim(cfg)),
        moe_layers=(True,) * cfg.num_hidden_layers,
        windows=(cfg.sliding_window,) * cfg.num_hidden_layers,
    )


def _write_mixtral(fc: FamilyConfig) -> dict[str, Any]:
    r = fc.moe.router
    return dict(
        **_write_common(fc),
        **_write_gqa(fc),
        intermediate_size=fc.moe.ff_size,
        num_local_experts=r.num_experts,
        num_experts_per_tok=r.top_k,
        router_jitter_noise=r.jitter_eps,
        sliding_window=_uniform_window(fc),
    )


MIXTRAL = FamilySpec(
    "mixtral",
    "MixtralForCausalLM",
    "MixtralConfig",
    HFNames(
        moe={
            "packed": MoENames("mlp.", "gate.", _FUSED),
            "per_expert": MoENames(
                "block_sparse_moe.",
                "gate.",
                ExpertNames(
                    "per_expert", ("experts.{e}.w1.weight", "experts.{e}.w3.weight", "experts.{e}.w2.weight")
                ),
            ),
        }
    ),
    _read_mixtral,
    _write_mixtral,
    PatchNames("MixtralSparseMoeBlock", "gate"),
    read_moe=_moe_mixtral,
)


def _moe_qwen2_moe(cfg: Any) -> MoEConfig:
    _require_silu(cfg.hidden_act, "hidden_act")
    spec = _router("qwen2_moe", cfg.num_experts, cfg.num_experts_per_tok, renorm=_renorm(cfg.norm_topk_prob))
    return MoEConfig(
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        spec,
        num_shared_experts=1,
        shared_ff_size=cfg.shared_expert_intermediate_size,
        shared_gate=True,
    )


def _read_qwen2_moe(cfg: Any) -> dict[str, Any]:
    moe = _moe_qwen2_moe(cfg)
    return dict(
        **_common(cfg),
        attention=_gqa(cfg, head_dim=cfg.hidden_size // cfg.num_attention_heads, qkv_bias=cfg.qkv_bias),
        rope=_read_rope(cfg, cfg.hidden_size // cfg.num_attention_heads),
        moe=moe,
        moe_layers=_sparse_layers(cfg, cfg.num_experts),
        windows=_typed_windows(cfg),
        dense_ff_size=cfg.intermediate_size,
    )


def _write_qwen2_moe(fc: FamilyConfig) -> dict[str, Any]:
    r = fc.moe.router
    gqa = _write_gqa(fc)
    gqa.pop("head_dim", None)  # Qwen2-MoE derives it from hidden_size / num_attention_heads
    windows = _write_typed_windows(fc)
    return dict(
        **_write_common(fc),
        **gqa,
        **_write_sparse_layers(fc),
        **windows,
        use_sliding_window=windows["sliding_window"] is not None,
        qkv_bias=fc.attention.qkv_bias,
        intermediate_size=fc.dense_ff_size or fc.hf_config.get("intermediate_size", fc.moe.ff_size),
        moe_intermediate_size=fc.moe.ff_size,
        shared_expert_intermediate_size=fc.moe.shared_total_ff,
        num_experts=r.num_experts,
        num_experts_per_tok=r.top_k,
        norm_topk_prob=r.renorm == "sum",
    )


QWEN2_MOE = FamilySpec(
    "qwen2_moe",
    "Qwen2MoeForCausalLM",
    "Qwen2MoeConfig",
    HFNames(moe=_qwen_moe(shared="shared_expert.", shared_gate="shared_expert_gate.weight")),
    _read_qwen2_moe,
    _write_qwen2_moe,
    PatchNames("Qwen2MoeSparseMoeBlock", "gate", shared="shared_expert", shared_gate="shared_expert_gate"),
    read_moe=_moe_qwen2_moe,
)


def _moe_qwen3_moe(cfg: Any) -> MoEConfig:
    _require_silu(cfg.hidden_act, "hidden_act")
    spec = _router("qwen3_moe", cfg.num_experts, cfg.num_experts_per_tok, renorm=_renorm(cfg.norm_topk_prob))
    return MoEConfig(cfg.hidden_size, cfg.moe_intermediate_size, spec)


def _read_qwen3_moe(cfg: Any) -> dict[str, Any]:
    moe = _moe_qwen3_moe(cfg)
    bias = cfg.attention_bias
    return dict(
        **_common(cfg),
        attention=_gqa(cfg, qkv_bias=bias, out_bias=bias, qk_norm="per_head", norm_eps=cfg.rms_norm_eps),
        rope=_read_rope(cfg, _head_dim(cfg)),
        moe=moe,
        moe_layers=_sparse_layers(cfg, cfg.num_experts),
        windows=(cfg.sliding_window,) * cfg.num_hidden_layers,
        dense_ff_size=cfg.intermediate_size,
    )


def _write_qwen3_moe(fc: FamilyConfig) -> dict[str, Any]:
    r = fc.moe.router
    window = _uniform_window(fc)
    return dict(
        **_write_common(fc),
        **_write_gqa(fc),
        **_write_sparse_layers(fc),
        use_sliding_window=window is not None,
        sliding_window=window if window is not None else fc.hf_config.get("sliding_window", 4096),
        attention_bias=fc.attention.qkv_bias,
        intermediate_size=fc.dense_ff_size or fc.hf_config.get("intermediate_size", fc.moe.ff_size),
        moe_intermediate_size=fc.moe.ff_size,
        num_experts=r.num_experts,
        num_experts_per_tok=r.top_k,
        norm_topk_prob=r.renorm == "sum",
    )


QWEN3_MOE = FamilySpec(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    "Qwen3MoeConfig",
    HFNames(moe=_qwen_moe()),
    _read_qwen3_moe,
    _write_qwen3_moe,
    PatchNames("Qwen3MoeSparseMoeBlock", "gate"),
    read_moe=_moe_qwen3_moe,
)


def _moe_olmoe(cfg: Any) -> MoEConfig:
    _require_silu(cfg.hidden_act, "hidden_act")
    spec = _router("olmoe", cfg.num_experts, cfg.num_experts_per_tok, renorm=_renorm(cfg.norm_topk_prob))
    return MoEConfig(cfg.hidden_size, cfg.intermediate_size, spec)


def _read_olmoe(cfg: Any) -> dict[str, Any]:
    moe = _moe_olmoe(cfg)
    bias = cfg.attention_bias
    attention = _gqa(
        cfg,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        qkv_bias=bias,
        out_bias=bias,
        qk_norm="whole",
        norm_eps=cfg.rms_norm_eps,
        clip_qkv=cfg.clip_qkv,
    )
    return dict(
        **_common(cfg),
        attention=attention,
        rope=_read_rope(cfg, cfg.hidden_size // cfg.num_attention_heads),
        moe=moe,
        moe_layers=(True,) * cfg.num_hidden_layers,
        windows=(None,) * cfg.num_hidden_layers,
    )


def _write_olmoe(fc: FamilyConfig) -> dict[str, Any]:
    r = fc.moe.router
    gqa = _write_gqa(fc)
    gqa.pop("head_dim", None)
    return dict(
        **_write_common(fc),
        **gqa,
        attention_bias=fc.attention.qkv_bias,
        clip_qkv=fc.attention.clip_qkv,
        intermediate_size=fc.moe.ff_size,
        num_experts=r.num_experts,
        num_experts_per_tok=r.top_k,
        norm_topk_prob=r.renorm == "sum",
    )


OLMOE = FamilySpec(
    "olmoe",
    "OlmoeForCausalLM",
    "OlmoeConfig",
    HFNames(moe=_qwen_moe()),
    _read_olmoe,
    _write_olmoe,
    PatchNames("OlmoeSparseMoeBlock", "gate"),
    read_moe=_moe_olmoe,
)


def _mla_scaling(cfg: Any) -> float:
    """transformers' `yarn_apply_mscale`: YaRN with `mscale_all_dim` sharpens the softmax."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    params = cfg.rope_parameters or {}
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        factor = params["factor"]
        mscale = 1.0 if factor <= 1 else 0.1 * params["mscale_all_dim"] * math.log(factor) + 1.0
        scale = scale * mscale * mscale
    return scale


def _moe_deepseek_v3(cfg: Any) -> MoEConfig:
    _require_silu(cfg.hidden_act, "hidden_act")
    if not cfg.n_shared_experts:
        raise ConfigError(
            "n_shared_experts", "moekit imports DeepSeek-V3 models with at least one shared expert"
        )
    spec = _router(
        "deepseek_v3",
        cfg.n_routed_experts,
        cfg.num_experts_per_tok,
        num_groups=cfg.n_group or 1,
        topk_groups=cfg.topk_group or 1,
        renorm=_renorm(cfg.norm_topk_prob),
        scaling=float(cfg.routed_scaling_factor),
    )
    return MoEConfig(
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        spec,
        num_shared_experts=cfg.n_shared_experts,
        shared_ff_size=cfg.moe_intermediate_size,
    )


def _read_deepseek_v3(cfg: Any) -> dict[str, Any]:
    moe = _moe_deepseek_v3(cfg)
    attention = AttentionConfig(
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
        kind="mla",
        qkv_bias=cfg.attention_bias,
        out_bias=cfg.attention_bias,
        scaling=_mla_scaling(cfg),
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
    )
    layers = cfg.num_hidden_layers
    return dict(
        **_common(cfg),
        attention=attention,
        rope=_read_rope(cfg, cfg.qk_rope_head_dim, "interleaved" if cfg.rope_interleave else "half"),
        moe=moe,
        moe_layers=tuple(i >= cfg.first_k_dense_replace for i in range(layers)),
        windows=(None,) * layers,
        dense_ff_size=cfg.intermediate_size,
    )


def _write_deepseek_v3(fc: FamilyConfig) -> dict[str, Any]:
    r, a = fc.moe.router, fc.attention
    dense = [i for i, moe in enumerate(fc.moe_layers) if not moe]
    if dense != list(range(len(dense))):
        raise ConfigError("family.moe_layers", "DeepSeek-V3 has its dense layers first, then only MoE layers")
    return dict(
        **_write_common(fc),
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads,
        attention_bias=a.qkv_bias,
        q_lora_rank=a.q_lora_rank,
        kv_lora_rank=a.kv_lora_rank,
        qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim,
        rope_interleave=fc.rope.layout == "interleaved",
        first_k_dense_replace=len(dense),
        intermediate_size=fc.dense_ff_size or fc.hf_config.get("intermediate_size", fc.moe.ff_size),
        moe_intermediate_size=fc.moe.ff_size,
        n_shared_experts=fc.moe.num_shared_experts,
        n_routed_experts=r.num_experts,
        num_experts_per_tok=r.top_k,
        n_group=r.num_groups,
        topk_group=r.topk_groups,
        norm_topk_prob=r.renorm == "sum",
        routed_scaling_factor=r.scaling,
    )


DEEPSEEK_V3 = FamilySpec(
    "deepseek_v3",
    "DeepseekV3ForCausalLM",
    "DeepseekV3Config",
    HFNames(
        moe=_qwen_moe(selection_bias="gate.e_score_correction_bias", shared="shared_experts."),
        attn_renames={
            "q_a_norm.weight": "q_a_layernorm.weight",
            "kv_a_proj.weight": "kv_a_proj_with_mqa.weight",
            "kv_a_proj.bias": "kv_a_proj_with_mqa.bias",
            "kv_a_norm.weight": "kv_a_layernorm.weight",
        },
        # the multi-token-prediction layer after the last decoder layer (transformers drops it too)
        ignored=(r"^model\.layers\.{num_layers}\.",),
    ),
    _read_deepseek_v3,
    _write_deepseek_v3,
    PatchNames("DeepseekV3MoE", "gate", shared="shared_experts"),
    read_moe=_moe_deepseek_v3,
)


def _read_gpt_oss(cfg: Any) -> dict[str, Any]:
    spec = _router("gpt_oss", cfg.num_local_experts, cfg.num_experts_per_tok)
    moe = MoEConfig(
        cfg.hidden_size,
        cfg.intermediate_size,
        spec,
        activation="clamped_swiglu",
        swiglu_alpha=cfg.swiglu_alpha,
        swiglu_limit=cfg.swiglu_limit,
        expert_bias=True,
    )
    bias = cfg.attention_bias
    return dict(
        **_common(cfg),
        attention=_gqa(cfg, qkv_bias=bias, out_bias=bias, sinks=True, implementation="eager"),
        rope=_read_rope(cfg, _head_dim(cfg)),
        moe=moe,
        moe_layers=(True,) * cfg.num_hidden_layers,
        windows=_typed_windows(cfg),
        norm_upcast_weight=True,
        isolate_documents=False,  # transformers builds GPT-OSS masks without the position ids
    )


def _write_gpt_oss(fc: FamilyConfig) -> dict[str, Any]:
    r = fc.moe.router
    return dict(
        **_write_common(fc),
        **_write_gqa(fc),
        **_write_typed_windows(fc),
        attention_bias=fc.attention.qkv_bias,
        intermediate_size=fc.moe.ff_size,
        num_local_experts=r.num_experts,
        num_experts_per_tok=r.top_k,
        swiglu_alpha=fc.moe.swiglu_alpha,
        swiglu_limit=fc.moe.swiglu_limit,
    )


GPT_OSS = FamilySpec(
    "gpt_oss",
    "GptOssForCausalLM",
    "GptOssConfig",
    HFNames(
        moe=_one_layout(
            MoENames(
                "mlp.",
                "router.",
                ExpertNames(
                    "gpt_oss",
                    (
                        "experts.gate_up_proj",
                        "experts.down_proj",
                        "experts.gate_up_proj_bias",
                        "experts.down_proj_bias",
                    ),
                ),
            )
        )
    ),
    _read_gpt_oss,
    _write_gpt_oss,
    patch_note=(
        "GPT-OSS stores its experts transposed with gate and up interleaved, so a moekit layer "
        "cannot share those parameters; load it with moekit.from_hf instead"
    ),
)


def _moe_granitemoe(cfg: Any) -> MoEConfig:
    _require_silu(cfg.hidden_act, "hidden_act")
    spec = _router("granitemoe", cfg.num_local_experts, cfg.num_experts_per_tok)
    return MoEConfig(cfg.hidden_size, cfg.intermediate_size, spec)


def _read_granitemoe(cfg: Any) -> dict[str, Any]:
    moe = _moe_granitemoe(cfg)
    bias = cfg.attention_bias
    attention = _gqa(
        cfg,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        qkv_bias=bias,
        out_bias=bias,
        scaling=float(cfg.attention_multiplier),
    )
    return dict(
        **_common(cfg),
        attention=attention,
        rope=_read_rope(cfg, cfg.hidden_size // cfg.num_attention_heads),
        moe=moe,
        moe_layers=(True,) * cfg.num_hidden_layers,
        windows=(None,) * cfg.num_hidden_layers,
        embedding_multiplier=float(cfg.embedding_multiplier),
        residual_multiplier=float(cfg.residual_multiplier),
        logits_scaling=float(cfg.logits_scaling),
    )


def _write_granitemoe(fc: FamilyConfig) -> dict[str, Any]:
    r = fc.moe.router
    gqa = _write_gqa(fc)
    gqa.pop("head_dim", None)
    return dict(
        **_write_common(fc),
        **gqa,
        attention_bias=fc.attention.qkv_bias,
        attention_multiplier=fc.attention.softmax_scale,
        embedding_multiplier=fc.embedding_multiplier,
        residual_multiplier=fc.residual_multiplier,
        logits_scaling=fc.logits_scaling,
        intermediate_size=fc.moe.ff_size,
        num_local_experts=r.num_experts,
        num_experts_per_tok=r.top_k,
    )


GRANITEMOE = FamilySpec(
    "granitemoe",
    "GraniteMoeForCausalLM",
    "GraniteMoeConfig",
    HFNames(
        moe={
            "packed": MoENames("block_sparse_moe.", "router.", _FUSED),
            "per_expert": MoENames(
                "block_sparse_moe.",
                "router.layer.",
                ExpertNames("fused", ("input_linear.weight", "output_linear.weight")),
            ),
        }
    ),
    _read_granitemoe,
    _write_granitemoe,
    PatchNames("GraniteMoeMoE", "router"),
    read_moe=_moe_granitemoe,
)


def _read_dbrx(cfg: Any) -> dict[str, Any]:
    ffn, attn = cfg.ffn_config, cfg.attn_config
    _require_silu((ffn.ffn_act_fn or {}).get("name", "silu"), "ffn_config.ffn_act_fn.name")
    p = ffn.moe_normalize_expert_weights
    spec = _router(
        "dbrx",
        ffn.moe_num_experts,
        ffn.moe_top_k,
        renorm="none" if p is None else "pnorm",
        renorm_p=1.0 if p is None else float(p),
        jitter_eps=float(ffn.moe_jitter_eps or 0.0),
    )
    head_dim = cfg.d_model // cfg.n_heads
    attention = AttentionConfig(
        num_heads=cfg.n_heads,
        num_kv_heads=attn.kv_n_heads,
        head_dim=head_dim,
        fused_qkv=True,
        clip_qkv=attn.clip_qkv,
    )
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_layers=cfg.n_layers,
        attention=attention,
        rope=_read_rope(cfg, head_dim),
        moe=MoEConfig(cfg.d_model, ffn.ffn_hidden_size, spec),
        moe_layers=(True,) * cfg.n_layers,
        windows=(None,) * cfg.n_layers,
        norm="layer",
        norm_eps=1e-5,
        tie_embeddings=False,
    )


def _write_dbrx(fc: FamilyConfig) -> dict[str, Any]:
    r, a = fc.moe.router, fc.attention
    rope = _write_rope(fc.rope)
    attn_config = dict(fc.hf_config.get("attn_config") or {})
    ffn_config = dict(fc.hf_config.get("ffn_config") or {})
    # transformers' DBRX attention reads `attn_config.rope_theta`, which its config class lacks
    attn_config.update(kv_n_heads=a.num_kv_heads, clip_qkv=a.clip_qkv, rope_theta=fc.rope.theta)
    ffn_config.update(
        ffn_hidden_size=fc.moe.ff_size,
        moe_num_experts=r.num_experts,
        moe_top_k=r.top_k,
        moe_normalize_expert_weights=None if r.renorm == "none" else r.renorm_p,
        moe_jitter_eps=r.jitter_eps or None,
    )
    return dict(
        vocab_size=fc.vocab_size,
        d_model=fc.hidden_size,
        n_layers=fc.num_layers,
        n_heads=a.num_heads,
        max_seq_len=fc.rope.max_position_embeddings,
        attn_config=attn_config,
        ffn_config=ffn_config,
        tie_word_embeddings=False,
        **rope,
    )


DBRX = FamilySpec(
    "dbrx",
    "DbrxForCausalLM",
    "DbrxConfig",
    HFNames(
        moe=_one_layout(
            MoENames(
                "ffn.",
                "router.layer.",
                ExpertNames("dbrx", ("experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2")),
            )
        ),
        embed="transformer.wte.weight",
        norm="transformer.norm_f.weight",
        layer="transformer.blocks.{i}.",
        attn_norm="norm_attn_norm.norm_1.weight",
        ffn_norm="norm_attn_norm.norm_2.weight",
        attn="norm_attn_norm.attn.",
        attn_renames={"qkv_proj.weight": "Wqkv.weight", "o_proj.weight": "out_proj.weight"},
    ),
    _read_dbrx,
    _write_dbrx,
    patch_note=(
        "DBRX stores its experts as flat w1/v1/w2 matrices, so a moekit layer cannot share those "
        "parameters; load it with moekit.from_hf instead"
    ),
)


def _read_llama4(cfg: Any) -> dict[str, Any]:
    _require_silu(cfg.hidden_act, "hidden_act")
    spec = _router("llama4", cfg.num_local_experts, cfg.num_experts_per_tok)
    moe = MoEConfig(
        cfg.hidden_size,
        cfg.intermediate_size,
        spec,
        num_shared_experts=1,
        shared_ff_size=cfg.intermediate_size,
    )
    bias = cfg.attention_bias
    attention = _gqa(
        cfg,
        qkv_bias=bias,
        out_bias=bias,
        qk_norm="l2" if cfg.use_qk_norm else "none",
        norm_eps=cfg.rms_norm_eps,
        nope_temperature_scale=float(cfg.attn_scale) if cfg.attn_temperature_tuning else None,
        nope_temperature_floor=float(cfg.floor_scale),
    )
    layers = cfg.num_hidden_layers
    return dict(
        **_common(cfg),
        attention=attention,
        rope=_read_rope(cfg, _head_dim(cfg), "complex"),
        moe=moe,
        moe_layers=tuple(i in set(cfg.moe_layers) for i in range(layers)),
        windows=(None,) * layers,
        chunks=tuple(cfg.attention_chunk_size if t == "chunked_attention" else None for t in cfg.layer_types),
        rope_layers=tuple(bool(r) for r in cfg.no_rope_layers),
        dense_ff_size=cfg.intermediate_size_mlp,
    )


def _write_llama4(fc: FamilyConfig) -> dict[str, Any]:
    r, a = fc.moe.router, fc.attention
    chunks = {c for c in fc.chunks if c is not None}
    if len(chunks) > 1:
        raise ConfigError("family.chunks", f"Llama 4 has one attention chunk size, got {sorted(chunks)}")
    if _uniform_window(fc) is not None:
        raise ConfigError("family.windows", "Llama 4 has no sliding-window attention")
    layers = range(fc.num_layers)
    return dict(
        **_write_common(fc),
        **_write_gqa(fc),
        attention_bias=a.qkv_bias,
        use_qk_norm=a.qk_norm == "l2",
        attn_temperature_tuning=a.nope_temperature_scale is not None,
        attn_scale=a.nope_temperature_scale
        if a.nope_temperature_scale is not None
        else fc.hf_config.get("attn_scale", 0.1),
        floor_scale=_as_int(a.nope_temperature_floor, "attention.nope_temperature_floor"),
        intermediate_size=fc.moe.ff_size,
        intermediate_size_mlp=fc.dense_ff_size or fc.hf_config.get("intermediate_size_mlp", fc.moe.ff_size),
        num_local_experts=r.num_experts,
        num_experts_per_tok=r.top_k,
        moe_layers=[i for i in layers if fc.moe_layers[i]],
        no_rope_layers=[int(fc.rope_layers[i]) if fc.rope_layers else 1 for i in layers],
        layer_types=[
            "chunked_attention" if fc.chunks and fc.chunks[i] is not None else "full_attention"
            for i in layers
        ],
        attention_chunk_size=chunks.pop() if chunks else fc.hf_config.get("attention_chunk_size", 8192),
    )


LLAMA4 = FamilySpec(
    "llama4_text",
    "Llama4ForCausalLM",
    "Llama4TextConfig",
    HFNames(
        moe=_one_layout(
            MoENames(
                "feed_forward.",
                "router.",
                ExpertNames("transposed", ("experts.gate_up_proj", "experts.down_proj")),
                shared="shared_expert.",
            )
        ),
        dense="feed_forward.",
    ),
    _read_llama4,
    _write_llama4,
    patch_note=(
        "Llama 4 stores its experts transposed ([E, H, 2I]), so a moekit layer cannot share those "
        "parameters; load it with moekit.from_hf instead"
    ),
)


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V3, GPT_OSS, GRANITEMOE, DBRX, LLAMA4)
}
SUPPORTED = tuple(FAMILIES)


def supported_list() -> str:
    return ", ".join(f"{s.name} ({s.architecture})" for s in FAMILIES.values())


def family_spec(model_type: str, source: str = "config.json") -> FamilySpec:
    spec = FAMILIES.get(model_type)
    if spec is None:
        raise MoekitError(
            f"{source}: model_type {model_type!r} is not a supported MoE family; "
            f"supported: {supported_list()}"
        )
    return spec


def family_config_from_hf(
    hf_config: Any, layout: str, source: str = "config.json", raw: dict[str, Any] | None = None
) -> FamilyConfig:
    """The `FamilyConfig` of a transformers config object (its family from `model_type`); `raw`
    is the config.json it was read from, kept for export (default: the object's fields)."""
    spec = family_spec(hf_config.model_type, source)
    try:
        fields_ = spec.read_config(hf_config)
    except ConfigError as exc:
        raise exc.renamed(f"{source}: {exc.field}") from None
    except (AttributeError, KeyError, TypeError) as exc:
        raise MoekitError(
            f"{source}: not a usable {spec.name} config ({type(exc).__name__}: {exc})"
        ) from None
    kept = raw if raw is not None else hf_config.to_dict()
    return FamilyConfig(family=spec.name, hf_layout=layout, hf_config=kept, **fields_)
