"""Expert steering: promote the experts a reference domain uses, in chosen layers.

"Multilingual Routing in Mixture-of-Experts" (#50): find the experts frequently activated on
reference (e.g. English task) data and, at inference on other input, raise their router logits.
The paper pins neither the boost nor the selection; here both are parameters: the `top_n` experts
per layer with the largest reference selection frequency (or, given a baseline, the largest excess
over the baseline's frequency) get `strength` added to their logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.addressing import require_moe_layers
from moekit.errors import ConfigError, require_int, require_number
from moekit.inference.generate import _check_inputs
from moekit.inference.methods.common import full_logits
from moekit.routing.override import Overrides, RoutingCapture, RoutingOverride, override_routing


@torch.no_grad()
def expert_frequencies(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    overrides: Overrides | None = None,
) -> dict[int, Tensor]:
    """{MoE-layer index: fraction of real tokens that chose each expert [E]} on these rows (one
    forward pass), optionally under `overrides` (whose capture is replaced)."""
    layers = require_moe_layers(model, "expert frequencies")
    real = _check_inputs(model, input_ids, attention_mask, 0)
    capture = RoutingCapture()
    base = overrides or Overrides()
    with override_routing(model, Overrides(base.layers, base.default, capture)):
        full_logits(model, input_ids.long(), real)
    tokens = max(int(real.sum()), 1)
    out = {}
    for index, _, layer in layers:
        counts = torch.zeros(layer.config.router.num_experts)
        for routing in capture.routings.get(index, []):
            for part in (routing.kept, routing.dropped):
                counts += torch.bincount(part.expert.cpu(), minlength=counts.numel()).float()
        out[index] = counts / tokens
    return out


def steering_overrides(
    reference: dict[int, Tensor],
    layers: Sequence[int],
    *,
    strength: float = 1.0,
    top_n: int = 1,
    baseline: dict[int, Tensor] | None = None,
) -> Overrides:
    """Overrides adding `strength` to the router logits of each chosen layer's `top_n` reference
    experts (frequencies from `expert_frequencies`)."""
    require_number("strength", strength)
    require_int("top_n", top_n, minimum=1)
    chosen: dict[int | str, RoutingOverride] = {}
    count = len(reference)
    for key in layers:
        if isinstance(key, bool) or not isinstance(key, int) or not -count <= key < count:
            raise ConfigError("layers", f"got {key!r}, expected MoE-layer indices in [-{count}, {count})")
        index = key % count
        preference = reference[index]
        if baseline is not None:
            if index not in baseline:
                raise ConfigError("baseline", f"has no frequencies for MoE layer {index}")
            preference = preference - baseline[index]
        if top_n > preference.numel():
            raise ConfigError("top_n", f"got {top_n}, the layer has {preference.numel()} experts")
        bias = torch.zeros_like(preference)
        bias[preference.topk(top_n).indices] = strength
        chosen[index] = RoutingOverride(logit_bias=bias)
    return Overrides(layers=chosen)
