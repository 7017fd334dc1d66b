"""Rewiring experts on the fly: adapt the routers to the prompt, then generate.

"Rewiring Experts on the Fly: Continuous Rerouting for Online Adaptation" (#28): an additive
vector δ_l ∈ R^E on the router logits of a few layers (z_l ← z_l + δ_l), optimised by a few Adam
steps on the next-token loss of the prompt itself; the model's weights stay frozen. Choices the
paper leaves open, as parameters: the layers (default: the last two MoE layers), the steps and the
learning rate; the δ kept is the one with the lowest prompt loss seen (zero included), so
adaptation never makes the prompt loss worse. Re-adaptation during generation is not done here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.addressing import require_moe_layers, resolve_layer
from moekit.errors import require_int, require_number
from moekit.inference.generate import _check_inputs
from moekit.inference.methods.common import full_logits, next_token_loss
from moekit.inference.methods.cost import MethodCost
from moekit.routing.override import RoutingOverride, override_routing


@dataclass
class RewireResult:
    """The adapted biases {layer index: δ [E]}, the prompt loss before and after, and the cost."""

    biases: dict[int, Tensor]
    loss_before: float
    loss_after: float
    cost: MethodCost = field(default_factory=MethodCost)

    def overrides(self) -> dict[int | str, RoutingOverride]:
        """The overrides to generate with (`moekit.generate(..., overrides=result.overrides())`)."""
        return {index: RoutingOverride(logit_bias=bias) for index, bias in self.biases.items()}


def rewire(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    layers: Sequence[int | str] | None = None,
    steps: int = 5,
    lr: float = 0.1,
) -> RewireResult:
    """Optimise router-logit biases of `layers` (default: the last two MoE layers, or the only
    one) on the prompt's next-token loss."""
    require_int("steps", steps, minimum=0)
    require_number("lr", lr, minimum=0.0, strict=True)
    model_layers = require_moe_layers(model, "rewiring")
    if layers is None:
        layers = [index for index, _, _ in model_layers[-2:]]
    indices = sorted({resolve_layer(model_layers, key) for key in layers})
    real = _check_inputs(model, input_ids, attention_mask, 0)
    ids = input_ids.long()
    was_training = model.training
    model.eval()
    deltas = {}
    for index in indices:
        layer = model_layers[index][2]
        deltas[index] = torch.zeros(layer.config.router.num_experts, requires_grad=True)
    optimiser = torch.optim.Adam(list(deltas.values()), lr=lr)
    cost = MethodCost()
    best: tuple[float, dict[int, Tensor]] | None = None
    before = float("nan")
    try:
        for step in range(steps + 1):
            overrides = {index: RoutingOverride(logit_bias=delta) for index, delta in deltas.items()}
            with torch.enable_grad(), override_routing(model, overrides):
                loss = next_token_loss(full_logits(model, ids, real), ids, real)
            cost.forward_passes += 1
            value = float(loss.detach())
            if step == 0:
                before = value
            if best is None or value < best[0]:
                best = (value, {index: delta.detach().clone() for index, delta in deltas.items()})
            if step == steps:
                break
            grads = torch.autograd.grad(loss, list(deltas.values()), allow_unused=True)
            cost.backward_passes += 1
            for delta, grad in zip(deltas.values(), grads, strict=True):
                delta.grad = torch.zeros_like(delta) if grad is None else grad
            optimiser.step()
    finally:
        model.train(was_training)
    assert best is not None
    return RewireResult(best[1], before, best[0], cost)
