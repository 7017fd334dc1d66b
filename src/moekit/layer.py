"""The MoE layer: router + packed experts + grouped dispatch (+ shared experts). Thin glue."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from moekit.device import no_autocast
from moekit.dispatch.few_rows import routed_rows
from moekit.dispatch.grouped import BACKENDS
from moekit.errors import ConfigError, require_choice, require_int, require_known_fields, require_number
from moekit.experts.activations import ACTIVATION_NAMES, make_activation
from moekit.experts.factory import EXPERT_KINDS, build_experts, check_experts_config
from moekit.experts.packed import SharedExperts
from moekit.routing.factory import ROUTER_KINDS, build_router, check_router_config
from moekit.routing.override import (
    LayerOverride,
    RoutingOverride,
    apply_override,
    check_overridable,
    with_token_importance,
)
from moekit.routing.record import Routing
from moekit.routing.spec import RouterSpec, router_spec_from_dict


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer.

    `ff_size` is each routed expert's intermediate size (fine-grained experts: many small ones).
    `num_shared_experts` always-on experts of `shared_ff_size` each (default `ff_size`) are fused
    into one FFN, optionally behind a sigmoid gate (Qwen2-MoE).
    """

    hidden_size: int
    ff_size: int
    router: RouterSpec
    activation: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False
    num_shared_experts: int = 0
    shared_ff_size: int | None = None
    shared_gate: bool = False
    backend: str = "auto"
    router_kind: str = "token_choice"
    router_options: dict[str, Any] = field(default_factory=dict)
    experts_kind: str = "packed"
    experts_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_int("moe.hidden_size", self.hidden_size, minimum=1)
        require_int("moe.ff_size", self.ff_size, minimum=1)
        if not isinstance(self.router, RouterSpec):
            raise ConfigError("moe.router", f"expected a RouterSpec, got {type(self.router).__name__}")
        require_choice("moe.activation", self.activation, ACTIVATION_NAMES)
        require_number("moe.swiglu_limit", self.swiglu_limit, minimum=0.0, strict=True)
        require_number("moe.swiglu_alpha", self.swiglu_alpha, minimum=0.0, strict=True)
        require_int("moe.num_shared_experts", self.num_shared_experts, minimum=0)
        if self.shared_ff_size is not None:
            require_int("moe.shared_ff_size", self.shared_ff_size, minimum=1)
        require_choice("moe.backend", self.backend, BACKENDS)
        require_choice("moe.router_kind", self.router_kind, ROUTER_KINDS)
        if not isinstance(self.router_options, dict):
            raise ConfigError(
                "moe.router_options", f"expected a mapping, got {type(self.router_options).__name__}"
            )
        require_choice("moe.experts_kind", self.experts_kind, EXPERT_KINDS)
        check_router_config(self)
        check_experts_config(self)

    @property
    def shared_total_ff(self) -> int:
        return self.num_shared_experts * (self.shared_ff_size or self.ff_size)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["router"] = self.router.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], field_prefix: str = "moe") -> MoEConfig:
        require_known_fields(field_prefix, data, (f.name for f in fields(cls)))
        if "router" not in data:
            raise ConfigError(f"{field_prefix}.router", "missing")
        values = dict(data)
        router = values.pop("router")
        if not isinstance(router, RouterSpec):
            router = router_spec_from_dict(router, f"{field_prefix}.router")
        return cls(router=router, **values)


class MoE(nn.Module):
    """A drop-in FFN replacement: `y = moe(x)` for x [..., hidden]; `forward_with_routing` also
    returns the `Routing` record that objectives and analysis consume."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        activation = make_activation(config.activation, config.swiglu_alpha, config.swiglu_limit)
        self.router = build_router(config)
        self.experts = build_experts(config, activation)
        self.shared = (
            SharedExperts(config.hidden_size, config.shared_total_ff, activation, gate=config.shared_gate)
            if config.num_shared_experts
            else None
        )
        # set by `moekit.routing.override.override_routing` while its block runs
        self.routing_override: LayerOverride | None = None

    def forward(self, x: Tensor, token_mask: Tensor | None = None, token_ids: Tensor | None = None) -> Tensor:
        return self.forward_with_routing(x, token_mask, token_ids=token_ids)[0]

    def forward_with_routing(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        previous: Routing | None = None,
        token_ids: Tensor | None = None,
        override: RoutingOverride | None = None,
        attention_received: Tensor | None = None,
    ) -> tuple[Tensor, Routing]:
        """`previous` is the routing of the model's preceding MoE layer, for routers that carry
        state from layer to layer (e.g. a recurrent router); others ignore it. `token_ids` (the
        shape of `x` without its last dimension) reach routers that route on token identity (hash
        routing). A router with `route_iteratively` (chain-of-experts) interleaves its routing with
        the experts' compute. `override` (or the one `override_routing` attached) changes the
        router's decision before dispatch (`moekit.routing.override`). `attention_received` (the
        shape of `x` without its last dimension): the mean attention each token received in its
        block, for an override's token importance (`moekit.routing.importance`)."""
        shape = x.shape
        if shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"MoE input: expected last dimension {self.config.hidden_size}, got shape {tuple(shape)}"
            )
        flat = x.reshape(-1, shape[-1])
        mask = None
        if token_mask is not None:
            if token_mask.shape != shape[:-1]:
                raise ValueError(
                    f"token_mask: expected shape {tuple(shape[:-1])}, got {tuple(token_mask.shape)}"
                )
            mask = token_mask.reshape(-1).to(torch.bool)
        if override is None:
            fast = routed_rows(self, flat, mask)
            if fast is not None:  # a decoding step: router to experts in one call
                return self._finished(flat, *fast, shape)
        spec = self.config.router
        router_in = flat
        if self.training and spec.jitter_eps > 0:
            noise = torch.empty_like(flat).uniform_(1.0 - spec.jitter_eps, 1.0 + spec.jitter_eps)
            router_in = flat * noise
            if spec.jitter_target == "router_and_experts":
                flat = router_in
        router = self.router
        # (asked of the class: a missing attribute of a module raises inside nn.Module.__getattr__)
        iterate = router.route_iteratively if hasattr(type(router), "route_iteratively") else None
        if iterate is not None:
            if override is not None and not override.is_empty:
                check_overridable(self, -1)  # a chain router routes intermediate states: refused
            y, routing = iterate(flat, mask, previous, self.routed)
        else:
            extra = {}
            if getattr(type(router), "routes_on_token_ids", False):
                if token_ids is not None and token_ids.shape != shape[:-1]:
                    raise ValueError(
                        f"token_ids: expected shape {tuple(shape[:-1])}, got {tuple(token_ids.shape)}"
                    )
                extra["token_ids"] = None if token_ids is None else token_ids.reshape(-1)
            with no_autocast(router_in):  # under bf16 autocast the routing stays in fp32
                routing = router(router_in, mask, previous=previous, **extra)
                attached = self.routing_override
                if override is None and attached is not None:
                    override = attached.override
                if override is not None and not override.is_empty:
                    check_overridable(self, -1 if attached is None else attached.index)
                    if override.uses_importance:
                        routing = with_token_importance(routing, override, x, attention_received)
                    routing = apply_override(self, routing, override, shape[:-1])
            y = self.routed(flat, routing)
        return self._finished(flat, y, routing, shape)

    def _finished(
        self, flat: Tensor, y: Tensor, routing: Routing, shape: torch.Size
    ) -> tuple[Tensor, Routing]:
        """The routed output plus the shared experts', in the input's shape; the routing captured
        where an override asks for it."""
        if self.shared is not None:
            y = y + self.shared(flat)
        attached = self.routing_override
        if attached is not None and attached.capture is not None:
            attached.capture.add(attached.index, routing)
        return y.reshape(shape), routing

    def wants_attention_received(self, seq_len: int) -> bool:
        """Whether the attached override scores tokens by the attention they receive: the block
        then asks its attention for it (prefill only: a one-token step has no importance)."""
        attached = self.routing_override
        override = None if attached is None else attached.override
        return (
            seq_len > 1
            and override is not None
            and override.uses_importance
            and override.importance == "attention"
        )

    def routed(self, x: Tensor, routing: Routing) -> Tensor:
        """The routed experts' contribution for a given routing (replay, overrides, analysis)."""
        return self.experts.compute(x, routing, self.config.router.weight_on, self.config.backend)
