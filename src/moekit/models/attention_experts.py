"""Attention experts: a mixture of attention modules routed per token (BAM, Zhang et al. 2024, #31).

Expert e is a whole attention module, its own Q, K, V and O ("full attention experts"), or, with
`shared_kv`, its own Q and O over one key/value projection that every expert shares (BAM's
KV-sharing variant: one KV cache, as in a dense model). A linear router over the attention input
decides per token how the experts' outputs mix:

- `top_k: 0` (the default, BAM's choice): soft routing, every expert weighted by its router
  probability, y_t = sum_e p_e(x_t) Attn_e(x)_t;
- `top_k: k`: the k most probable experts, their probabilities renormalised to sum to 1.

The router is moekit's token-choice router, so its decision is a `Routing` record (the language
model returns one per layer in `attention_routings`) and a `RoutingOverride` applies to it
(`override_attention_routing`), e.g. to force one expert. Every expert's attention is computed at
every position, whatever the routing: keys and values are needed at all positions whichever
queries choose an expert, and soft routing uses every expert anyway; the experts' heads are
stacked into one scaled-dot-product call. Parameters per expert are named as a dense layer's
(`attn.experts.{e}.q_proj.weight`), so expert e of a mixed model is branch e's attention as is.
No HF family routes attention per token: models with attention experts stay moekit checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config_tree import dataclass_from_dict
from moekit.device import no_autocast
from moekit.errors import ConfigError, MoekitError, require_int
from moekit.kernels.linear import Linear
from moekit.routing.override import RoutingOverride, apply_override, as_overrides
from moekit.routing.record import Routing
from moekit.routing.spec import RouterSpec
from moekit.routing.token_choice import TokenChoiceRouter

if TYPE_CHECKING:
    from moekit.inference.kv_cache import LayerCache
    from moekit.models.lm import LMConfig


@dataclass(frozen=True)
class AttentionExpertsConfig:
    """Every layer's attention as `num_experts` experts; `top_k` 0 = soft routing (BAM)."""

    num_experts: int
    top_k: int = 0
    shared_kv: bool = False

    def __post_init__(self) -> None:
        require_int("model.attention_experts.num_experts", self.num_experts, minimum=1)
        require_int("model.attention_experts.top_k", self.top_k, minimum=0)
        if self.top_k > self.num_experts:
            raise ConfigError(
                "model.attention_experts.top_k",
                f"got {self.top_k}, expected at most num_experts={self.num_experts} (0 = soft routing)",
            )
        if not isinstance(self.shared_kv, bool):
            raise ConfigError(
                "model.attention_experts.shared_kv", f"got {self.shared_kv!r}, expected true or false"
            )

    @property
    def soft(self) -> bool:
        return self.top_k == 0

    def router_spec(self) -> RouterSpec:
        """Softmax router; soft routing is top-k over every expert (weights: the probabilities)."""
        k = self.num_experts if self.soft else self.top_k
        return RouterSpec(num_experts=self.num_experts, top_k=k, renorm="sum")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, field_prefix: str = "model.attention_experts") -> AttentionExpertsConfig:
        return dataclass_from_dict(cls, data, field_prefix)


@dataclass(frozen=True)
class _RouterSettings:
    """What `apply_override` reads of a layer's config: its router spec and kind."""

    router: RouterSpec
    router_kind: str = "token_choice"


@dataclass(frozen=True)
class _OverrideTarget:
    """The attention router seen as `apply_override` sees an MoE layer (config + router)."""

    config: _RouterSettings
    router: nn.Module


def add_key_value(module: nn.Module, config: LMConfig) -> None:
    """K and V projections (and the key norm) named as a dense attention layer's."""
    from moekit.models.lm import RMSNorm

    d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias != "none"
    module.k_proj = Linear(d, config.kv_heads * hd, bias=bias)
    module.v_proj = Linear(d, config.kv_heads * hd, bias=bias)
    if config.qk_norm:
        module.k_norm = RMSNorm(hd, config.norm_eps)


class ExpertProjections(nn.Module):
    """One attention expert's projections (Q and O; K and V too unless they are shared), with the
    biases and query/key norms the dense layer has; state-dict names as the dense layer's."""

    def __init__(self, config: LMConfig, own_kv: bool):
        from moekit.models.lm import RMSNorm

        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = Linear(d, config.num_heads * hd, bias=config.attention_bias != "none")
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.norm_eps)
        if own_kv:
            add_key_value(self, config)
        self.o_proj = Linear(config.num_heads * hd, d, bias=config.attention_bias == "all")


def dense_weights(routing: Routing, dtype: torch.dtype) -> Tensor:
    """The kept routing weights as [T, E] (zero where an expert is not chosen)."""
    kept = routing.kept
    zeros = torch.zeros(
        routing.num_tokens, routing.num_experts, dtype=kept.weight.dtype, device=kept.weight.device
    )
    return zeros.index_put((kept.token, kept.expert), kept.weight).to(dtype)


class AttentionExperts(nn.Module):
    """A drop-in replacement for the LM's attention: `forward_with_routing` returns the mixed
    output and the attention router's `Routing`."""

    def __init__(self, config: LMConfig):
        super().__init__()
        spec = config.attention_experts
        if spec is None:
            raise MoekitError("AttentionExperts: model.attention_experts is not set")
        self.config = config
        self.spec = spec
        d = config.hidden_size
        self.experts = nn.ModuleList(
            ExpertProjections(config, not spec.shared_kv) for _ in range(spec.num_experts)
        )
        if spec.shared_kv:
            add_key_value(self, config)
        self.router = TokenChoiceRouter(d, spec.router_spec())
        self._target = _OverrideTarget(_RouterSettings(spec.router_spec()), self.router)
        # set by `override_attention_routing` while its block runs
        self.routing_override: RoutingOverride | None = None

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    def route(self, x: Tensor, token_mask: Tensor | None) -> Routing:
        """The router's decision for the tokens of `x` [B, S, H] (any override applied)."""
        flat = x.reshape(-1, x.shape[-1])
        mask = None if token_mask is None else token_mask.reshape(-1).to(torch.bool)
        with no_autocast(flat):
            routing = self.router(flat, mask)
            override = self.routing_override
            if override is not None and not override.is_empty:
                routing = apply_override(self._target, routing, override, x.shape[:-1])
        return routing

    def forward_with_routing(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: LayerCache | None = None,
        token_mask: Tensor | None = None,
    ) -> tuple[Tensor, Routing]:
        b, s, d = x.shape
        cfg, count = self.config, self.spec.num_experts
        routing = self.route(x, token_mask)

        def heads(t: Tensor, n: int, norm: nn.Module | None = None) -> Tensor:
            t = t.view(b, s, n, cfg.head_dim)
            return (t if norm is None else norm(t)).transpose(1, 2)

        def queries(e: nn.Module) -> Tensor:
            return heads(e.q_proj(x), cfg.num_heads, getattr(e, "q_norm", None))

        def keys_values(m: nn.Module) -> tuple[Tensor, Tensor]:
            k = heads(m.k_proj(x), cfg.kv_heads, getattr(m, "k_norm", None))
            return k, heads(m.v_proj(x), cfg.kv_heads)

        # experts' heads stacked: query head e*H + j belongs to expert e
        q = torch.cat([queries(e) for e in self.experts], dim=1)
        if self.spec.shared_kv:
            k, v = keys_values(self)
        else:
            pairs = [keys_values(e) for e in self.experts]
            k, v = torch.cat([p[0] for p in pairs], dim=1), torch.cat([p[1] for p in pairs], dim=1)
        from moekit.models.lm import apply_rope

        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # shared: one expert's worth of keys, the point of sharing
        if self.spec.shared_kv and count > 1:  # key head i of expert e sits at e*KV + i
            k, v = k.repeat(1, count, 1, 1), v.repeat(1, count, 1, 1)
        groups = cfg.num_heads // cfg.kv_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, enable_gqa=groups > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)
        out = out.transpose(1, 2).reshape(b, s, count, cfg.num_heads * cfg.head_dim)
        weights = dense_weights(routing, x.dtype)
        y = torch.zeros(b * s, d, dtype=x.dtype, device=x.device)
        for e, expert in enumerate(self.experts):
            y = y + weights[:, e : e + 1] * expert.o_proj(out[:, :, e]).reshape(-1, d)
        return y.view(b, s, d), routing

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: LayerCache | None = None
    ) -> Tensor:
        return self.forward_with_routing(x, cos, sin, mask, cache)[0]


def attention_expert_layers(model: nn.Module) -> list[AttentionExperts]:
    return [m for m in model.modules() if isinstance(m, AttentionExperts)]


@contextmanager
def override_attention_routing(
    model: nn.Module, overrides: Mapping[int, RoutingOverride] | RoutingOverride | None
) -> Iterator[None]:
    """Apply routing overrides to the attention routers of `model` (keys: the index among its
    attention-expert layers, negative from the end; one override: every layer), restored on exit."""
    layers = attention_expert_layers(model)
    if not layers:
        raise MoekitError("an attention routing override needs a model with attention experts")
    plan = as_overrides(overrides)
    per_index: dict[int, RoutingOverride] = {}
    for key, item in plan.layers.items():
        if isinstance(key, bool) or not isinstance(key, int) or not -len(layers) <= key < len(layers):
            raise ConfigError("overrides", f"got layer {key!r}, expected an index in [0, {len(layers)})")
        per_index[key % len(layers)] = item
    previous = [layer.routing_override for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.routing_override = per_index.get(i, plan.default)
        yield
    finally:
        for layer, old in zip(layers, previous, strict=True):
            layer.routing_override = old
