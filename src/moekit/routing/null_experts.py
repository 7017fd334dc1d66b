"""Null experts (Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing with Null Experts", #34).

The router scores the E real experts plus m null experts that output zero and cost nothing, and
each token takes its top-k' over all E + m. A token whose choices fall on null experts uses fewer
real experts, so the number of real experts per token varies in [0, k'] while the router stays a
plain top-k. The record has E + m logit columns and `num_compute_experts = E`: dispatch skips the
null assignments; balancing sees them, and `moekit.balance`'s load-balancing loss replaces the null
experts' counts by their mean (AdaMoE's null-aware LBL, `null_aware_load_balancing_loss`).

The released code (exp_1) concatenates the original gate with a new gate d -> m for the nulls; one
linear layer over E + m outputs is the same function. Weights follow exp_2: the chosen real
experts' probabilities, renormalised among the chosen real experts when `router.renorm="sum"`;
null assignments are kept with weight zero.

Spec axes: `num_experts` = E real experts, `top_k` = k' over all E + m (at most E, a RouterSpec
bound); `renorm`, `renorm_p`, `renorm_eps`, `scaling` over the chosen real experts; `router_bias`,
`capacity_factor`, `drop_policy` (capacity limits real experts only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.errors import require_int
from moekit.routing.base import SpecRouter
from moekit.routing.linear_logits import LinearLogits
from moekit.routing.options import ROUTER_OPTIONS, require_softmax_set_spec
from moekit.routing.record import Routing
from moekit.routing.selection import (
    assignments_from_mask,
    real_tokens,
    renormalise_selected,
    split_by_capacity,
)
from moekit.routing.spec import RouterSpec


@dataclass(frozen=True)
class NullExpertOptions:
    """`num_null`: m zero-compute experts added after the E real ones (AdaMoE uses m = E)."""

    num_null: int

    def __post_init__(self) -> None:
        require_int(f"{ROUTER_OPTIONS}.num_null", self.num_null, minimum=1)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """bool [T, E]: each token's k highest scores (ties to the lower expert id)."""
    index = scores.topk(k, dim=-1, sorted=True).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)


class NullExpertRouter(SpecRouter):
    """softmax over E real + m null experts -> top-k' -> weights on the chosen real experts."""

    @staticmethod
    def check_config(spec: RouterSpec, options: NullExpertOptions) -> None:
        require_softmax_set_spec(spec, "null_experts")

    def __init__(self, hidden_size: int, spec: RouterSpec, options: NullExpertOptions):
        super().__init__(spec, options)
        self.linear = LinearLogits(hidden_size, spec.num_experts + options.num_null, bias=spec.router_bias)

    @property
    def extra_experts(self) -> int:
        return self.options.num_null

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
        selected = topk_mask(probs, self.spec.top_k)
        real_selected = selected.clone()
        real_selected[:, self.num_compute_experts :] = False
        weights = renormalise_selected(probs * real_selected, real_selected, self.spec)
        chosen = assignments_from_mask(selected, weights, probs, mask)
        kept, dropped = split_by_capacity(chosen, self.spec, x.shape[0], self.num_compute_experts, generator)
        return Routing(logits, probs, kept, dropped, mask, self.num_compute_experts)
