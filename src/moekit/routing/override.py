"""Routing overrides: change what an MoE layer's router decides, from outside the model.

One mechanism serves the inference-time methods of the seed papers (Rewiring and multilingual
steering optimise an additive logit bias, C3PO re-mixes the chosen experts' weights, DES and
dynamic pruning change k, SCMoE compares a model with its own weaker routing) and works in training
and in generation, on any model whose MoE FFNs are moekit `MoE` layers:

    with override_routing(model, {3: RoutingOverride(logit_bias=bias, mask=[0, 5])}):
        logits = model(ids).logits

or `moekit.generate(..., overrides=...)`. The override is applied inside the layer's routing (after
the router's logits, before dispatch), so the `Routing` record every consumer sees (objectives,
the recorder, captures) is the overridden one. An empty override leaves the router's record
untouched: outputs are bit-identical to running without it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, MoekitError
from moekit.routing.importance import (
    IMPORTANCE_KEY,
    IMPORTANCE_KINDS,
    importance_split,
    mc_moe_importance,
    released_importance,
)
from moekit.routing.record import Routing
from moekit.routing.selection import assignments_from_mask, renormalise_selected, split_by_capacity
from moekit.routing.token_choice import group_limited, score
from moekit.routing.top_p import top_p_selection

if TYPE_CHECKING:
    from moekit.layer import MoE

# router kinds whose decision is a function of the logits that an override can redo
OVERRIDABLE_KINDS = ("token_choice", "top_p")


def _expert_set(field_name: str, value: Any, num_experts: int) -> Tensor | None:
    """Expert ids (a sequence of ints, or a bool [E] tensor) as a bool [E] mask."""
    if value is None:
        return None
    if isinstance(value, Tensor) and value.dtype == torch.bool:
        if value.shape != (num_experts,):
            raise ConfigError(
                field_name, f"expected a bool mask of shape ({num_experts},), got {tuple(value.shape)}"
            )
        return value
    ids = value.tolist() if isinstance(value, Tensor) else list(value)
    out = torch.zeros(num_experts, dtype=torch.bool)
    for expert in ids:
        if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < num_experts:
            raise ConfigError(field_name, f"got expert {expert!r}, expected ids in [0, {num_experts})")
        out[expert] = True
    return out


@dataclass
class RoutingOverride:
    """What to change in one layer's routing (every field optional).

    - `logit_bias`: added to the router logits, [E] or [T, E] (T = the layer's flattened tokens);
      may require grad: the gradient of the loss reaches it (Rewiring #28, steering #50).
    - `force` / `mask`: experts always chosen / never chosen (ids or a bool [E] mask).
    - `top_k`: a different number of experts per token; 0 skips the routed experts (only shared
      experts and the residual remain). `top_p`: choose the smallest set, most probable first,
      whose softmax mass reaches p (capped by `top_k` when both are given).
    - `weights`: replacement routing weights, [E] or [T, E]; the chosen experts take these weights
      instead of the router's (C3PO #29 re-mixes the chosen experts).
    - `ranks`: choose the experts at these ranks of the router's preference (0 = its first
      choice) instead of its top k: SCMoE's (#11) rank-k weak routing, e.g. `ranks=[2]`.
    - `min_weight_ratio`: drop every chosen expert except each token's first whose weight is
      below this fraction of the first's (MC-MoE #38's online dynamic pruning; the kept weights
      are not renormalised, so the dropped expert's share is simply skipped). 0 drops nothing.
    - `skip_fraction` / `protect_fraction`: MC-MoE's token-importance half of the same pruning
      (τ_l, τ_h; `moekit.routing.importance`): in each prefilled sequence the least important
      fraction of tokens keep only their `skipped_top_k` best experts (0: none, as the paper) and
      the most important fraction keep the routing the other rules would give them without any
      pruning (`min_weight_ratio` spares them). `importance`: "attention" (the paper's score,
      from the block's attention probabilities) or "position" (the released code's, no
      attention needed; also where an attention path gives no probabilities). One-token
      decoding steps have no importance and are left alone. `spare_last_token` (default True)
      never skips a sequence's last token, whose output is the next token's distribution
      (`moekit.routing.importance.importance_split`); False is the paper's rule as written.
    - `where`: bool, broadcastable to the layer input's leading shape ([B, S] or [S]); tokens
      outside keep the router's own routing. None = every token.
    """

    logit_bias: Tensor | None = None
    force: Sequence[int] | Tensor | None = None
    mask: Sequence[int] | Tensor | None = None
    top_k: int | None = None
    top_p: float | None = None
    weights: Tensor | None = None
    where: Tensor | None = None
    min_weight_ratio: float | None = None
    ranks: Sequence[int] | None = None
    skip_fraction: float | None = None
    protect_fraction: float | None = None
    skipped_top_k: int = 0
    importance: str = "attention"
    spare_last_token: bool = True

    def __post_init__(self) -> None:
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0
        ):
            raise ConfigError("override.top_k", f"got {self.top_k!r}, expected an integer >= 0")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ConfigError("override.top_p", f"got {self.top_p!r}, expected a number in (0, 1]")
        for name in ("min_weight_ratio", "skip_fraction", "protect_fraction"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0
            ):
                raise ConfigError(f"override.{name}", f"got {value!r}, expected a number in [0, 1]")
        if (
            isinstance(self.skipped_top_k, bool)
            or not isinstance(self.skipped_top_k, int)
            or self.skipped_top_k < 0
        ):
            raise ConfigError(
                "override.skipped_top_k", f"got {self.skipped_top_k!r}, expected an integer >= 0"
            )
        if self.importance not in IMPORTANCE_KINDS:
            raise ConfigError(
                "override.importance",
                f"got {self.importance!r}, expected one of {', '.join(IMPORTANCE_KINDS)}",
            )
        if self.ranks is not None and (
            not self.ranks
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in self.ranks)
            or len(set(self.ranks)) != len(self.ranks)
        ):
            raise ConfigError("override.ranks", f"got {self.ranks!r}, expected distinct integers >= 0")
        if self.ranks is not None and (self.top_k is not None or self.top_p is not None):
            raise ConfigError("override.ranks", "cannot be combined with top_k or top_p")
        for name in ("logit_bias", "weights", "where"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Tensor):
                raise ConfigError(f"override.{name}", f"expected a tensor, got {type(value).__name__}")

    @property
    def is_empty(self) -> bool:
        return all(
            getattr(self, name) is None
            for name in (
                "logit_bias",
                "force",
                "mask",
                "top_k",
                "top_p",
                "weights",
                "where",
                "min_weight_ratio",
                "ranks",
                "skip_fraction",
                "protect_fraction",
            )
        )

    @property
    def uses_importance(self) -> bool:
        """Whether the token-importance rule is on (a non-zero skip or protect fraction)."""
        return bool(self.skip_fraction) or bool(self.protect_fraction)


class RoutingCapture:
    """Records the (detached) `Routing` of every MoE layer call while attached: `routings[i]` is
    the list of layer i's records in call order (one per forward, or per decoding step)."""

    def __init__(self) -> None:
        self.routings: dict[int, list[Routing]] = {}

    def add(self, index: int, routing: Routing) -> None:
        self.routings.setdefault(index, []).append(routing.detach())

    def clear(self) -> None:
        self.routings.clear()


@dataclass
class Overrides:
    """Per-layer overrides keyed by MoE-layer index (negative from the end) or module name,
    `default` for every other layer, and an optional capture of every layer's routing."""

    layers: Mapping[int | str, RoutingOverride] = field(default_factory=dict)
    default: RoutingOverride | None = None
    capture: RoutingCapture | None = None


@dataclass(frozen=True)
class LayerOverride:
    """What one layer applies: its override (or None) and the capture to report to."""

    index: int
    override: RoutingOverride | None
    capture: RoutingCapture | None


def as_overrides(
    value: Overrides | Mapping[int | str, RoutingOverride] | RoutingOverride | None,
) -> Overrides:
    """Accept an `Overrides`, a {layer: RoutingOverride} mapping, or one override for every layer."""
    if value is None:
        return Overrides()
    if isinstance(value, Overrides):
        return value
    if isinstance(value, RoutingOverride):
        return Overrides(default=value)
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(item, RoutingOverride):
                raise MoekitError(
                    f"overrides[{key!r}]: expected a RoutingOverride, got {type(item).__name__}"
                )
        return Overrides(layers=dict(value))
    raise MoekitError(
        f"overrides: expected Overrides, a mapping or a RoutingOverride, got {type(value).__name__}"
    )


@contextmanager
def override_routing(
    model: nn.Module, overrides: Overrides | Mapping[int | str, RoutingOverride] | RoutingOverride | None
) -> Iterator[Overrides]:
    """Apply `overrides` to the MoE layers of `model` inside the block (restored on exit, also on
    error); nested blocks replace the outer one for the layers they name."""
    from moekit.addressing import require_moe_layers, resolve_layer

    overrides = as_overrides(overrides)
    layers = require_moe_layers(model, "a routing override")
    per_index = {resolve_layer(layers, key): item for key, item in overrides.layers.items()}
    previous = []
    try:
        for index, _, layer in layers:
            override = per_index.get(index, overrides.default)
            if override is not None:
                check_overridable(layer, index)
            previous.append((layer, layer.routing_override))
            layer.routing_override = LayerOverride(index, override, overrides.capture)
        yield overrides
    finally:
        for layer, old in reversed(previous):
            layer.routing_override = old


def check_overridable(layer: MoE, index: int) -> None:
    kind = layer.config.router_kind
    if kind not in OVERRIDABLE_KINDS:
        raise MoekitError(
            f"MoE layer {index}: routing overrides support routers of kind {', '.join(OVERRIDABLE_KINDS)}; "
            f"this layer's router_kind is {kind!r}"
        )


def _per_token(name: str, value: Tensor, num_tokens: int, num_experts: int, like: Tensor) -> Tensor:
    if value.shape not in ((num_experts,), (num_tokens, num_experts)):
        raise ConfigError(
            f"override.{name}",
            f"expected shape ({num_experts},) or ({num_tokens}, {num_experts}), got {tuple(value.shape)}",
        )
    return value.to(device=like.device, dtype=like.dtype)


def apply_override(
    layer: MoE, routing: Routing, override: RoutingOverride, leading_shape: torch.Size
) -> Routing:
    """The routing `layer`'s router would produce under `override`, from its own record.

    Re-selects from the biased logits with the router's own rule (score function, score timing,
    selection bias, group limits, renormalisation, scaling, capacity), then merges back the router's
    routing for tokens outside `where`."""
    if override.is_empty:
        return routing
    spec = layer.config.router
    num_tokens, num_experts = routing.logits.shape
    logits = routing.logits
    if override.logit_bias is not None:
        logits = logits + _per_token("logit_bias", override.logit_bias, num_tokens, num_experts, logits)
    forced = _expert_set("override.force", override.force, num_experts)
    masked = _expert_set("override.mask", override.mask, num_experts)
    if forced is not None and masked is not None and bool((forced & masked).any()):
        raise ConfigError("override.force", "an expert cannot be both forced and masked")
    top_p_router = layer.config.router_kind == "top_p"
    k = override.top_k if override.top_k is not None else spec.top_k
    if override.ranks is not None:
        if top_p_router:
            raise ConfigError("override.ranks", "needs a top-k router; this layer routes by top-p")
        k = max(override.ranks) + 1
        if k > num_experts:
            raise ConfigError("override.ranks", f"got rank {k - 1}, the layer has {num_experts} experts")
    if (
        override.top_k is not None
        and override.top_k > num_experts
        and override.top_p is None
        and not top_p_router
    ):
        # a k past the layer's experts would be clamped: the override would silently ask for less
        raise ConfigError("override.top_k", f"got {override.top_k}, the layer has {num_experts} experts")
    if override.skipped_top_k > num_experts:
        raise ConfigError(
            "override.skipped_top_k", f"got {override.skipped_top_k}, the layer has {num_experts} experts"
        )
    k = min(k, num_experts)
    allowed = num_experts - (0 if masked is None else int(masked.sum()))
    if k > allowed and override.top_p is None and not top_p_router:
        raise ConfigError(
            "override.mask",
            f"masks {num_experts - allowed} of {num_experts} experts, leaving fewer than k={k}",
        )
    if forced is not None and int(forced.sum()) > k:
        raise ConfigError("override.force", f"forces {int(forced.sum())} experts, more than k={k}")
    scores = torch.softmax(logits, dim=-1) if top_p_router else score(logits, spec.score_fn)
    preference = scores if spec.score_timing == "before_topk" else logits
    selection_bias = getattr(layer.router, "selection_bias", None)
    if selection_bias is not None:
        preference = preference + selection_bias.to(preference.dtype)
    preference = preference.detach()
    if masked is not None:
        preference = preference.masked_fill(masked.to(preference.device), float("-inf"))
    if forced is not None:
        preference = preference.masked_fill(forced.to(preference.device), float("inf"))
    if spec.num_groups > 1:
        preference = group_limited(preference, spec.num_groups, spec.topk_groups, spec.group_score)
    p = override.top_p if override.top_p is not None else (layer.router.options.p if top_p_router else None)
    if k == 0:
        selected = torch.zeros_like(logits, dtype=torch.bool)
    elif p is not None:
        probs = torch.softmax(logits, dim=-1).detach()
        if masked is not None:
            probs = probs.masked_fill(masked.to(probs.device), 0.0)
        if forced is not None:  # forced experts first, then the threshold rule over the rest
            probs = probs.masked_fill(forced.to(probs.device), 2.0)
        selected = top_p_selection(probs, p, k)
        if masked is not None:
            selected &= ~masked.to(selected.device)
    else:
        index = preference.topk(k, dim=-1).indices
        if override.ranks is not None:
            index = index[:, list(override.ranks)]
        selected = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, index, True)
    if override.weights is not None:
        dense = _per_token("weights", override.weights, num_tokens, num_experts, scores)
        weights = torch.where(selected, dense.expand_as(scores), torch.zeros_like(scores))
    elif spec.score_timing == "after_topk" and not top_p_router:
        chosen_logits = logits.masked_fill(~selected, float("-inf"))
        if spec.score_fn == "softmax":
            weights = torch.softmax(chosen_logits, dim=-1).nan_to_num(0.0)
        else:
            weights = torch.where(selected, score(logits, spec.score_fn), torch.zeros_like(logits))
        weights = renormalise_selected(weights, selected, spec)
    else:
        weights = renormalise_selected(
            torch.where(selected, scores, torch.zeros_like(scores)), selected, spec
        )
    skip, protect = _importance_split(routing, override, leading_shape)
    if override.min_weight_ratio is not None:
        first = weights.detach().masked_fill(~selected, float("-inf")).max(dim=-1, keepdim=True)
        is_first = torch.zeros_like(selected).scatter_(1, first.indices, True) & selected
        below = weights.detach() < override.min_weight_ratio * first.values.clamp_min(0.0)
        pruned = below & ~is_first
        if protect is not None:
            pruned &= ~protect[:, None]
        selected = selected & ~pruned
        weights = torch.where(selected, weights, torch.zeros_like(weights))
    if skip is not None:
        keep = torch.zeros_like(selected)
        m = min(override.skipped_top_k, num_experts)
        if m:
            best = weights.detach().masked_fill(~selected, float("-inf")).topk(m, dim=-1).indices
            keep = keep.scatter_(1, best, True) & selected
        selected = torch.where(skip[:, None], keep, selected)
        weights = torch.where(selected, weights, torch.zeros_like(weights))
    if override.where is not None:
        where = override.where.to(torch.bool).to(logits.device)
        try:
            where = where.expand(leading_shape).reshape(-1)
        except RuntimeError:
            raise ConfigError(
                "override.where",
                f"expected a bool tensor broadcastable to {tuple(leading_shape)}, got {tuple(where.shape)}",
            ) from None
        original_selected, original_weights = dense_routing(routing)
        selected = torch.where(where[:, None], selected, original_selected)
        weights = torch.where(where[:, None], weights, original_weights.to(weights.dtype))
        logits = torch.where(where[:, None], logits, routing.logits)
        scores = torch.where(where[:, None], scores, routing.scores)
    chosen = assignments_from_mask(
        selected, weights, preference.nan_to_num(0.0, posinf=1e30, neginf=-1e30), routing.token_mask
    )
    kept, dropped = split_by_capacity(chosen, spec, num_tokens, routing.num_compute_experts)
    return replace(routing, logits=logits, scores=scores, kept=kept, dropped=dropped)


def sequence_rows(leading_shape: torch.Size) -> tuple[int, int]:
    """(rows, positions) of a layer input's leading shape: [B, S] as it is, anything else as one
    sequence of all its tokens."""
    if len(leading_shape) == 2:
        return int(leading_shape[0]), int(leading_shape[1])
    return 1, int(torch.Size(leading_shape).numel())


def with_token_importance(
    routing: Routing, override: RoutingOverride, x: Tensor, attention_received: Tensor | None
) -> Routing:
    """The record with each token's importance in `extras[IMPORTANCE_KEY]` ([T] fp32): MC-MoE's
    attention score where the block gave the attention received, otherwise (importance
    "position", or an attention path without probabilities) the released code's score."""
    rows = sequence_rows(x.shape[:-1])
    hidden = x.reshape(*rows, x.shape[-1])
    if override.importance == "attention" and attention_received is not None:
        importance = mc_moe_importance(hidden, attention_received.reshape(rows))
    else:
        importance = released_importance(hidden, routing.token_mask.reshape(rows))
    return replace(routing, extras={**routing.extras, IMPORTANCE_KEY: importance.reshape(-1).detach()})


def _importance_split(
    routing: Routing, override: RoutingOverride, leading_shape: torch.Size
) -> tuple[Tensor | None, Tensor | None]:
    """(skip, protect) bool [T] of the token-importance rule, or (None, None) where it is off or
    the step has one token per sequence (decoding)."""
    importance = routing.extras.get(IMPORTANCE_KEY)
    if not override.uses_importance or importance is None:
        return None, None
    rows = sequence_rows(leading_shape)
    if rows[1] <= 1:
        return None, None
    skip, protect = importance_split(
        importance.reshape(rows),
        routing.token_mask.reshape(rows),
        override.skip_fraction or 0.0,
        override.protect_fraction or 0.0,
        override.spare_last_token,
    )
    return skip.reshape(-1), protect.reshape(-1)


def dense_routing(routing: Routing) -> tuple[Tensor, Tensor]:
    """(selected bool [T, E], weights [T, E]) of a record's kept and dropped assignments (dropped
    ones selected with their weight, as the router chose them)."""
    shape = routing.logits.shape
    selected = torch.zeros(shape, dtype=torch.bool, device=routing.logits.device)
    weights = torch.zeros(shape, dtype=routing.kept.weight.dtype, device=routing.logits.device)
    for part in (routing.kept, routing.dropped):
        selected = selected.index_put(
            (part.token, part.expert), torch.ones_like(part.token, dtype=torch.bool)
        )
        weights = weights.index_put((part.token, part.expert), part.weight)
    return selected, weights
