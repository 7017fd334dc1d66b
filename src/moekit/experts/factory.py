"""Which routed-experts module a layer's config asks for. Listed explicitly: no import-time registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from moekit.errors import ConfigError
from moekit.experts.activations import Activation
from moekit.experts.packed import PackedExperts

if TYPE_CHECKING:
    from moekit.layer import MoEConfig

EXPERT_KINDS = ("packed",)


def build_experts(config: MoEConfig, activation: Activation) -> nn.Module:
    """A module with `compute(x, routing, weight_on, backend) -> Tensor` (the routed sum)."""
    if config.experts_kind == "packed":
        if config.experts_options:
            raise ConfigError("moe.experts_options", "packed experts take no options")
        return PackedExperts(
            config.router.num_experts, config.hidden_size, config.ff_size, activation, bias=config.expert_bias
        )
    raise ConfigError(
        "moe.experts_kind", f"got {config.experts_kind!r}, expected one of {', '.join(EXPERT_KINDS)}"
    )
