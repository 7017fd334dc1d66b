"""Which routed-experts module a layer's config asks for. Listed explicitly: no import-time registry.

| experts_kind | paper                | experts_options               | fast path                         |
|--------------|----------------------|-------------------------------|-----------------------------------|
| `packed`     | standard FFN experts | none                          | grouped GEMMs                     |
| `latent`     | #14 MoLE             | latent_size                   | grouped GEMMs in the latent space |
| `lora`       | #36 LoRAMoE          | rank, alpha, freeze_base      | block-gated low-rank GEMMs        |
| `smora`      | #47 SMoRA            | alpha, freeze_base            | block-gated low-rank GEMMs        |
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from moekit.errors import ConfigError
from moekit.experts.activations import Activation
from moekit.experts.latent import LatentExperts, LatentOptions
from moekit.experts.lora import LoRAExperts, LoRAOptions
from moekit.experts.packed import PackedExperts
from moekit.experts.smora import SMoRAExperts, SMoRAOptions
from moekit.routing.options import EXPERTS_OPTIONS, options_from_dict

if TYPE_CHECKING:
    from moekit.layer import MoEConfig

EXPERT_KINDS = ("packed", "latent", "lora", "smora")


def experts_options(config: MoEConfig) -> Any:
    """The validated options object of the config's experts kind (None for `packed`)."""
    kind = config.experts_kind
    if kind == "packed":
        if config.experts_options:
            raise ConfigError(EXPERTS_OPTIONS, "packed experts take no options")
        return None
    if kind == "latent":
        options = options_from_dict(LatentOptions, config.experts_options, EXPERTS_OPTIONS)
        if options.latent_size > config.hidden_size:
            raise ConfigError(
                f"{EXPERTS_OPTIONS}.latent_size",
                f"got {options.latent_size}, expected at most moe.hidden_size={config.hidden_size}",
            )
        return options
    if kind in ("lora", "smora"):
        if config.expert_bias:
            raise ConfigError("moe.expert_bias", f"{kind} experts have no biases; expected false")
        options_cls = LoRAOptions if kind == "lora" else SMoRAOptions
        return options_from_dict(options_cls, config.experts_options, EXPERTS_OPTIONS)
    raise ConfigError("moe.experts_kind", f"got {kind!r}, expected one of {', '.join(EXPERT_KINDS)}")


def check_experts_config(config: MoEConfig) -> None:
    """Validate the experts kind and its options without building the module."""
    experts_options(config)


def build_experts(config: MoEConfig, activation: Activation) -> nn.Module:
    """A module with `compute(x, routing, weight_on, backend) -> Tensor` (the routed sum)."""
    options = experts_options(config)
    num_experts, hidden, ff = config.router.num_experts, config.hidden_size, config.ff_size
    kind = config.experts_kind
    if kind == "packed":
        return PackedExperts(num_experts, hidden, ff, activation, bias=config.expert_bias)
    if kind == "latent":
        return LatentExperts(
            num_experts, hidden, ff, activation, options.latent_size, bias=config.expert_bias
        )
    if kind == "lora":
        return LoRAExperts(
            num_experts, hidden, ff, activation, options.rank, options.alpha, options.freeze_base
        )
    return SMoRAExperts(num_experts, hidden, ff, activation, options.alpha, options.freeze_base)
