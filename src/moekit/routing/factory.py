"""Which router class a layer's config asks for. Listed here explicitly: no import-time registry.

| router_kind        | paper                      | router_options                                        |
|--------------------|----------------------------|-------------------------------------------------------|
| `token_choice`     | HF families (spec-driven)  | none (use `moe.router`)                               |
| `top_p`            | #9 dynamic routing         | p                                                     |
| `null_experts`     | #34 AdaMoE                 | num_null                                              |
| `dynamic_capacity` | #2 UniMoE-Audio DCMoE      | p, num_null (needs num_shared_experts >= 1)           |
| `expert_choice`    | Zhou et al. 2022 / #24     | capacity_factor                                       |
| `hash`             | Roller et al. 2021         | vocab_size, seed (needs token_ids)                    |
| `recurrent`        | #16 RMoE                   | state_size, cell, shared_cell                         |
| `stochastic`       | #33 THOR                   | train_sampling, eval_sampling                         |
| `dense_to_sparse`  | #51 EvoMoE                 | temperature_max/_min, schedule, decay_steps,          |
|                    |                            | threshold, hard_after, weights                        |
| `cosine`           | #18 ProMoE / #23           | dim, temperature                                      |
| `chain`            | #25 chain-of-experts       | iterations, inner_residual, shared_router             |
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from moekit.errors import ConfigError
from moekit.routing.chain import ChainOptions, ChainRouter
from moekit.routing.cosine import CosineOptions, CosineRouter
from moekit.routing.dense_to_sparse import DenseToSparseOptions, DenseToSparseRouter
from moekit.routing.dynamic_capacity import DynamicCapacityOptions, DynamicCapacityRouter
from moekit.routing.expert_choice import ExpertChoiceOptions, ExpertChoiceRouter
from moekit.routing.hash import HashOptions, HashRouter
from moekit.routing.null_experts import NullExpertOptions, NullExpertRouter
from moekit.routing.options import ROUTER_OPTIONS, options_from_dict
from moekit.routing.recurrent import RecurrentOptions, RecurrentRouter
from moekit.routing.stochastic import StochasticOptions, StochasticRouter
from moekit.routing.token_choice import TokenChoiceRouter
from moekit.routing.top_p import TopPOptions, TopPRouter

if TYPE_CHECKING:
    from moekit.layer import MoEConfig

ROUTER_KINDS = (
    "token_choice",
    "top_p",
    "null_experts",
    "dynamic_capacity",
    "expert_choice",
    "hash",
    "recurrent",
    "stochastic",
    "dense_to_sparse",
    "cosine",
    "chain",
)


def _router_class(kind: str) -> tuple[type[nn.Module], type] | None:
    """(router class, options class) of a research router kind; None for `token_choice`."""
    match kind:
        case "top_p":
            return TopPRouter, TopPOptions
        case "null_experts":
            return NullExpertRouter, NullExpertOptions
        case "dynamic_capacity":
            return DynamicCapacityRouter, DynamicCapacityOptions
        case "expert_choice":
            return ExpertChoiceRouter, ExpertChoiceOptions
        case "hash":
            return HashRouter, HashOptions
        case "recurrent":
            return RecurrentRouter, RecurrentOptions
        case "stochastic":
            return StochasticRouter, StochasticOptions
        case "dense_to_sparse":
            return DenseToSparseRouter, DenseToSparseOptions
        case "cosine":
            return CosineRouter, CosineOptions
        case "chain":
            return ChainRouter, ChainOptions
    return None


def router_options(config: MoEConfig) -> Any:
    """The validated options object of the config's router kind (None for `token_choice`)."""
    if config.router_kind == "token_choice":
        if config.router_options:
            raise ConfigError(ROUTER_OPTIONS, "the token_choice router takes no options (use moe.router)")
        return None
    classes = _router_class(config.router_kind)
    if classes is None:
        raise ConfigError(
            "moe.router_kind", f"got {config.router_kind!r}, expected one of {', '.join(ROUTER_KINDS)}"
        )
    router_cls, options_cls = classes
    options = options_from_dict(options_cls, config.router_options, ROUTER_OPTIONS)
    router_cls.check_config(config.router, options)
    if config.router_kind == "dynamic_capacity" and config.num_shared_experts < 1:
        raise ConfigError(
            "moe.num_shared_experts",
            "got 0; the dynamic_capacity router (UniMoE-Audio) keeps shared experts always on, expected >= 1",
        )
    return options


def check_router_config(config: MoEConfig) -> None:
    """Validate the router kind, its options and the spec axes it reads, without building it."""
    router_options(config)


def build_router(config: MoEConfig) -> nn.Module:
    """A module with `forward(x, token_mask=None, previous=None) -> Routing` (the chain router instead
    has `route_iteratively`; the hash router also takes `token_ids`)."""
    options = router_options(config)
    if options is None:
        return TokenChoiceRouter(config.hidden_size, config.router)
    router_cls, _ = _router_class(config.router_kind)
    return router_cls(config.hidden_size, config.router, options)
