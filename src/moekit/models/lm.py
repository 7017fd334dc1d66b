"""A decoder-only language model whose FFN in each layer is dense or a moekit MoE.

RMSNorm, rotary position embeddings, causal attention through SDPA (documents in a packed row
never attend to each other), SwiGLU FFNs. Readable top to bottom, in the spirit of nanoGPT.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError, require_choice, require_int, require_known_fields, require_number
from moekit.experts.activations import swiglu_with_grad
from moekit.inference.kv_cache import KVCache, LayerCache, step_mask
from moekit.kernels import rms_norm as rms_norm_kernel
from moekit.kernels import rope as rope_kernel
from moekit.kernels.linear import Linear
from moekit.layer import MoE, MoEConfig
from moekit.models.attention_experts import AttentionExperts, AttentionExpertsConfig
from moekit.routing.importance import attention_received
from moekit.routing.record import Routing
from moekit.routing.recurrent import tie_recurrent_cells

ATTENTION_BIASES = ("none", "qkv", "all")


@dataclass(frozen=True)
class LMConfig:
    """The model. `moe` (None for a dense model) configures every MoE layer; which layers are
    MoE follows the pattern: the first `first_dense_layers` are dense, then every `moe_every`-th.
    `attention_experts` makes every layer's attention a routed mixture of attention experts, and
    `parallel_block` runs attention and FFN side by side on the same input (both BAM, #31).
    `attention_head_dim` (default hidden_size / num_heads), `attention_bias` ("qkv": Qwen2's
    query/key/value biases; "all": output too) and `qk_norm` (per-head RMSNorm of queries and keys
    before RoPE, Qwen3) hold the attention of HF Qwen2 and Qwen3 models."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ff_size: int
    max_seq_len: int
    num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    moe: MoEConfig | None = None
    first_dense_layers: int = 0
    moe_every: int = 1
    attention_experts: AttentionExpertsConfig | None = None
    parallel_block: bool = False
    attention_head_dim: int | None = None
    attention_bias: str = "none"
    qk_norm: bool = False

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "ff_size",
            "max_seq_len",
            "moe_every",
        ):
            require_int(f"model.{name}", getattr(self, name), minimum=1)
        require_int("model.first_dense_layers", self.first_dense_layers, minimum=0)
        if self.attention_head_dim is not None:
            require_int("model.attention_head_dim", self.attention_head_dim, minimum=2)
            if self.attention_head_dim % 2:
                raise ConfigError("model.attention_head_dim", "must be even for RoPE")
        elif self.hidden_size % self.num_heads:
            raise ConfigError(
                "model.num_heads",
                f"got {self.num_heads}, expected a divisor of hidden_size={self.hidden_size}",
            )
        elif (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                "model.num_heads", "the head dimension hidden_size/num_heads must be even for RoPE"
            )
        require_choice("model.attention_bias", self.attention_bias, ATTENTION_BIASES)
        if not isinstance(self.qk_norm, bool):
            raise ConfigError("model.qk_norm", f"got {self.qk_norm!r}, expected true or false")
        kv = self.kv_heads
        require_int("model.num_kv_heads", kv, minimum=1)
        if self.num_heads % kv:
            raise ConfigError(
                "model.num_kv_heads", f"got {kv}, expected a divisor of num_heads={self.num_heads}"
            )
        require_number("model.rope_theta", self.rope_theta, minimum=0.0, strict=True)
        require_number("model.norm_eps", self.norm_eps, minimum=0.0, strict=True)
        require_number("model.init_std", self.init_std, minimum=0.0, strict=True)
        if self.attention_experts is not None and not isinstance(
            self.attention_experts, AttentionExpertsConfig
        ):
            raise ConfigError(
                "model.attention_experts",
                f"expected an AttentionExpertsConfig, got {type(self.attention_experts).__name__}",
            )
        if not isinstance(self.parallel_block, bool):
            raise ConfigError("model.parallel_block", f"got {self.parallel_block!r}, expected true or false")
        if self.moe is not None and self.moe.hidden_size != self.hidden_size:
            raise ConfigError(
                "model.moe.hidden_size",
                f"got {self.moe.hidden_size}, expected model.hidden_size={self.hidden_size}",
            )

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    def is_moe_layer(self, index: int) -> bool:
        if self.moe is None or index < self.first_dense_layers:
            return False
        return (index - self.first_dense_layers) % self.moe_every == 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["moe"] = None if self.moe is None else self.moe.to_dict()
        data["attention_experts"] = (
            None if self.attention_experts is None else self.attention_experts.to_dict()
        )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], field_prefix: str = "model") -> LMConfig:
        require_known_fields(field_prefix, data, (f.name for f in fields(cls)))
        values = dict(data)
        moe = values.pop("moe", None)
        if moe is not None and not isinstance(moe, MoEConfig):
            moe = MoEConfig.from_dict(
                {"hidden_size": values.get("hidden_size"), **moe}, f"{field_prefix}.moe"
            )
        experts = values.get("attention_experts")
        if experts is not None and not isinstance(experts, AttentionExpertsConfig):
            values["attention_experts"] = AttentionExpertsConfig.from_dict(
                experts, f"{field_prefix}.attention_experts"
            )
        missing = [f.name for f in fields(cls) if f.name not in values and f.default is MISSING]
        if missing:
            raise ConfigError(f"{field_prefix}.{missing[0]}", "missing")
        return cls(moe=moe, **values)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm_kernel.normalize(x, self.weight, self.eps)  # torch.rms_norm's bits


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [B, S, head_dim] for integer `positions` [B, S] (RoFormer, Su et al. 2021, eq. 34)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    angles = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [B, H, S, D] queries or keys (the half-split convention used by HF Llama), by the
    tables of `rope_tables`: transformers' x * cos + cat(-x2, x1) * sin, on moekit's kernel where
    it runs (the same bits, forward and backward: `kernels.rope`)."""
    return rope_kernel.rotate_half(x, cos.unsqueeze(1), sin.unsqueeze(1), signed_sin=False)


def attention_mask(doc_ids: Tensor | None, seq_len: int, device: torch.device) -> Tensor | None:
    """Causal mask, block-diagonal over documents when rows are packed ([B, 1, S, S] bool)."""
    if doc_ids is None:
        return None
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    mask = same_doc & causal
    # padding rows (doc id -1) attend to themselves so that no softmax row is empty
    mask |= torch.eye(seq_len, dtype=torch.bool, device=device)
    return mask.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        d, h, kv, hd = config.hidden_size, config.num_heads, config.kv_heads, config.head_dim
        qkv_bias = config.attention_bias != "none"
        self.q_proj = Linear(d, h * hd, bias=qkv_bias)
        self.k_proj = Linear(d, kv * hd, bias=qkv_bias)
        self.v_proj = Linear(d, kv * hd, bias=qkv_bias)
        self.o_proj = Linear(h * hd, d, bias=config.attention_bias == "all")
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.norm_eps)
            self.k_norm = RMSNorm(hd, config.norm_eps)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: LayerCache | None = None,
        want_received: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """The attention output; with `want_received`, also the mean attention each token
        received ([B, S], `moekit.routing.importance.attention_received`)."""
        b, s, _ = x.shape
        cfg = self.config
        q = self.q_proj(x).view(b, s, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).view(b, s, cfg.kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        groups = cfg.num_heads // cfg.kv_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, enable_gqa=groups > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)
        out = self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        if want_received:
            return out, attention_received(q, k, cfg.head_dim**-0.5, mask)
        return out


class DenseFFN(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)), gate and up fused in one projection."""

    def __init__(self, hidden: int, ff: int):
        super().__init__()
        self.proj_in = Linear(hidden, 2 * ff, bias=False)
        self.proj_out = Linear(ff, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj_out(swiglu_with_grad(self.proj_in(x)))


class Block(nn.Module):
    def __init__(self, config: LMConfig, index: int):
        super().__init__()
        self.parallel = config.parallel_block
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn: nn.Module = AttentionExperts(config) if config.attention_experts else Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn: nn.Module = (
            MoE(config.moe) if config.is_moe_layer(index) else DenseFFN(config.hidden_size, config.ff_size)
        )

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        token_mask: Tensor | None,
        previous: Routing | None = None,
        token_ids: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> tuple[Tensor, Routing | None, Routing | None]:
        """(output, the MoE FFN's routing, the attention experts' routing); None where dense."""
        a_in = self.attn_norm(x)
        received = None  # attention experts give no probabilities: importance falls back to its proxy
        if isinstance(self.attn, AttentionExperts):
            a, attn_routing = self.attn.forward_with_routing(a_in, cos, sin, mask, cache, token_mask)
        elif self.is_moe and self.ffn.wants_attention_received(x.shape[1]):
            (a, received), attn_routing = self.attn(a_in, cos, sin, mask, cache, want_received=True), None
        else:
            a, attn_routing = self.attn(a_in, cos, sin, mask, cache), None
        if not self.parallel:  # sequential: x + attn(norm(x)), then the FFN on that sum
            x = x + a
        h = self.ffn_norm(x)  # parallel (BAM, GPT-NeoX): both read the block's input x
        if self.is_moe:
            y, routing = self.ffn.forward_with_routing(
                h, token_mask, previous=previous, token_ids=token_ids, attention_received=received
            )
        else:
            y, routing = self.ffn(h), None
        return (x + a + y if self.parallel else x + y), routing, attn_routing


@dataclass
class LMOutput:
    logits: Tensor  # [B, S, V]
    routings: list[Routing]  # one per MoE layer, in layer order
    attention_routings: list[Routing] = field(default_factory=list)  # one per attention-experts layer


class LanguageModel(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        tie_recurrent_cells(self)  # RMoE (#16): one GRU cell for every recurrent router
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, init_std), output projections scaled by 1/sqrt(2 * layers); attention
        biases (Qwen2, Qwen3) start at zero."""
        std = self.config.init_std
        out_std = std / (2 * self.config.num_layers) ** 0.5
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith("_proj.bias"):
                    nn.init.zeros_(p)
                continue
            is_output = name.endswith(("o_proj.weight", "proj_out.weight", "experts.w_out"))
            nn.init.normal_(p, std=out_std if is_output else std)
        for moe in self.moe_layers:  # the part of a method's init the loop above overwrote (LoRA's zero B)
            for part in (moe.router, moe.experts):
                restore = getattr(part, "restore_own_init", None)
                if restore is not None:
                    restore()

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache for incremental decoding (`capacity`: the positions it will hold)."""
        return KVCache([None] * self.config.num_layers, capacity)

    @property
    def context_length(self) -> int:
        return self.config.max_seq_len

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        doc_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> LMOutput:
        """`input_ids` [B, S]; `positions` within each document (default 0..S-1); `doc_ids` make
        attention block-diagonal for packed rows; `token_mask` keeps padding out of routing (and,
        with a `cache` from `new_cache()`, out of attention: incremental decoding of left-padded rows)."""
        b, s = input_ids.shape
        start = 0 if cache is None else len(cache)
        if start + s > self.config.max_seq_len:
            raise ValueError(
                f"input_ids: sequence length {start + s} exceeds model.max_seq_len={self.config.max_seq_len}"
            )
        if positions is None:
            positions = torch.arange(start, start + s, device=input_ids.device).expand(b, s)
        x = self.embed(input_ids)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        if cache is None:
            mask = attention_mask(doc_ids, s, input_ids.device)
        else:
            if doc_ids is not None:
                raise ValueError("doc_ids: packed rows are not supported with a KV cache")
            start = cache.begin((b, s) if token_mask is None else token_mask.bool(), input_ids.device)
            mask = step_mask(cache, start, None, None, materialise=False)
        routings, attention_routings = [], []
        for index, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[index]
            previous = routings[-1] if routings else None
            x, routing, attn_routing = block(x, cos, sin, mask, token_mask, previous, input_ids, layer_cache)
            if routing is not None:
                routings.append(routing)
            if attn_routing is not None:
                attention_routings.append(attn_routing)
        return LMOutput(self.head(self.norm(x)), routings, attention_routings)


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int  # touched per token (each MoE layer: router, shared experts and top_k routed experts)
    embedding: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def count_parameters(model: LanguageModel) -> ParameterCounts:
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in model.moe_layers:
        experts = moe.experts
        if hasattr(experts, "expert_parameter_count"):  # latent / LoRA experts: shared parts stay active
            per_expert = experts.expert_parameter_count()
        else:
            per_expert = sum(p[0].numel() for p in experts.parameters())
        # nominal k: top_k for token-choice kinds (dynamic-k routers vary around it, see Routing)
        k = min(moe.config.router.top_k, experts.num_experts)
        inactive += (experts.num_experts - k) * per_expert
    return ParameterCounts(total=total, active=total - inactive, embedding=model.embed.weight.numel())
