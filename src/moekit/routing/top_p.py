"""Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts", #9).

Each token takes the smallest set of experts, most probable first, whose softmax probabilities sum
to at least p: confident tokens use one expert, uncertain ones several. Without a counterweight the
router learns to flatten p so that many experts clear the threshold; the paper adds the routing
entropy as a loss (`moekit.routing.objectives_research.top_p_entropy_loss`, or the `entropy`
objective of `moekit.balance`).

Spec axes used: `top_k` is a cap on experts per token (set it to `num_experts` for the uncapped rule
of the paper); `renorm`/`renorm_p`/`renorm_eps`/`scaling` shape the weights (the released code uses
raw probabilities: `renorm="none"`, the default); `router_bias`, `capacity_factor`, `drop_policy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.routing.base import SpecRouter
from moekit.routing.linear_logits import LinearLogits
from moekit.routing.options import ROUTER_OPTIONS, require_fraction, require_softmax_set_spec
from moekit.routing.record import Routing
from moekit.routing.selection import (
    assignments_from_mask,
    real_tokens,
    renormalise_selected,
    split_by_capacity,
)
from moekit.routing.spec import RouterSpec


@dataclass(frozen=True)
class TopPOptions:
    """`p`: the probability mass each token's experts must reach, in (0, 1]; 0.4 is the released
    config's `top_p_threshold`."""

    p: float = 0.4

    def __post_init__(self) -> None:
        require_fraction(f"{ROUTER_OPTIONS}.p", self.p)


def top_p_selection(probs: Tensor, p: float, max_experts: int | None = None) -> Tensor:
    """Huang et al. 2024 (#9), the top-p rule: bool [T, E], for each token the smallest prefix of its
    experts sorted by probability whose cumulative probability reaches `p` (the expert that crosses p
    is included, as in the released `modeling_moe.py`), at most `max_experts` of them, at least one.

    An expert is kept iff the mass of the experts ranked before it is still below p.
    """
    sorted_probs, order = torch.sort(probs.detach(), dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    mass_before[..., 0] = 0.0
    keep_sorted = mass_before < p
    if max_experts is not None:
        keep_sorted[..., max_experts:] = False
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


class TopPRouter(SpecRouter):
    """softmax(W x) -> the top-p set per token -> weights (raw or renormalised) -> capacity."""

    @staticmethod
    def check_config(spec: RouterSpec, options: TopPOptions) -> None:
        require_softmax_set_spec(spec, "top_p")

    def __init__(self, hidden_size: int, spec: RouterSpec, options: TopPOptions):
        super().__init__(spec, options)
        self.linear = LinearLogits(hidden_size, self.num_experts, bias=spec.router_bias)

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        previous: Routing | None = None,
        generator: torch.Generator | None = None,
    ) -> Routing:
        """Route T tokens of `x` [T, d]; `previous` is not used by this router."""
        mask = real_tokens(token_mask, x.shape[0], x.device)
        logits = self.linear(x)
        probs = torch.softmax(logits, dim=-1)
        selected = top_p_selection(probs, self.options.p, self.spec.top_k)
        weights = renormalise_selected(probs * selected, selected, self.spec)
        chosen = assignments_from_mask(selected, weights, probs, mask)
        compute = self.num_compute_experts  # the experts beyond it (if any) cost nothing
        kept, dropped = split_by_capacity(chosen, self.spec, x.shape[0], compute, generator)
        return Routing(logits, probs, kept, dropped, mask, compute)
