"""Which router class a layer's config asks for. Listed here explicitly: no import-time registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from moekit.errors import ConfigError
from moekit.routing.token_choice import TokenChoiceRouter

if TYPE_CHECKING:
    from moekit.layer import MoEConfig

ROUTER_KINDS = ("token_choice",)


def build_router(config: MoEConfig) -> nn.Module:
    """A module with `forward(x, token_mask=None, previous=None) -> Routing`."""
    if config.router_kind == "token_choice":
        if config.router_options:
            raise ConfigError(
                "moe.router_options", "the token_choice router takes no options (use moe.router)"
            )
        return TokenChoiceRouter(config.hidden_size, config.router)
    raise ConfigError(
        "moe.router_kind", f"got {config.router_kind!r}, expected one of {', '.join(ROUTER_KINDS)}"
    )
