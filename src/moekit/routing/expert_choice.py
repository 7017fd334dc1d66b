"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"; the
data-selection paradigm of UoE, #24): each expert picks its own tokens.

S = softmax(X W_g) over experts for every token; expert e then keeps the C real tokens with the
highest S[:, e], where C = min(T, ceil(c * k * T / E)) for T real tokens (Zhou et al.'s
k = n * c / e, with c * k the average number of experts per token). Every expert therefore does
exactly C tokens of work, perfectly balanced by construction, while a token may get any number of
experts, zero included (the residual path carries it). The weight is S[t, e].

A token's experts depend on the other tokens of the batch, so in a causal LM this router sees the
future within its batch (as the paper notes for decoding); keep that in mind when comparing
losses. The record's `rank` is a token's place in the expert's own order (0 = the expert's best).

Spec axes: `top_k` = k, the average experts per token at c = 1; `score_fn` softmax or sigmoid;
`router_bias`. Capacity is this router's option `capacity_factor` (c), not the spec's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.errors import require_number
from moekit.routing.base import SpecRouter
from moekit.routing.linear_logits import LinearLogits
from moekit.routing.options import ROUTER_OPTIONS, require_spec_defaults, require_spec_value
from moekit.routing.record import Assignments, Routing
from moekit.routing.selection import real_tokens
from moekit.routing.spec import RouterSpec
from moekit.routing.token_choice import score


@dataclass(frozen=True)
class ExpertChoiceOptions:
    """`capacity_factor` c: each expert takes c * top_k * T / E tokens (c = 1: as many expert
    computations as top-k routing)."""

    capacity_factor: float = 1.0

    def __post_init__(self) -> None:
        require_number(f"{ROUTER_OPTIONS}.capacity_factor", self.capacity_factor, minimum=0.0, strict=True)


def expert_choice_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Zhou et al. 2022: tokens per expert C = ceil(c * k * T / E), at most T."""
    return min(num_tokens, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


def expert_choice_assignments(scores: Tensor, token_mask: Tensor, capacity: int) -> Assignments:
    """Each expert's `capacity` best real tokens by `scores` [T, E], as expert-sorted assignments
    (tokens ascending within an expert; `rank` = place in the expert's order)."""
    num_tokens, num_experts = scores.shape
    device = scores.device
    if capacity == 0:
        return Assignments.empty(device)
    selection = scores.detach().masked_fill(~token_mask.unsqueeze(-1), float("-inf"))
    chosen = selection.topk(capacity, dim=0, sorted=True).indices  # [C, E], best first
    token, rank = torch.sort(chosen, dim=0)
    token, rank = token.t().reshape(-1), rank.t().reshape(-1)
    expert = torch.arange(num_experts, device=device).repeat_interleave(capacity)
    return Assignments(token, expert, scores[token, expert], rank)


class ExpertChoiceRouter(SpecRouter):
    @staticmethod
    def check_config(spec: RouterSpec, options: ExpertChoiceOptions) -> None:
        require_spec_defaults(spec, "expert_choice", {"score_fn", "router_bias"})
        require_spec_value(spec, "expert_choice", "score_fn", ("softmax", "sigmoid"))

    def __init__(self, hidden_size: int, spec: RouterSpec, options: ExpertChoiceOptions):
        super().__init__(spec, options)
        self.linear = LinearLogits(hidden_size, spec.num_experts, bias=spec.router_bias)

    def capacity(self, num_real_tokens: int) -> int:
        return expert_choice_capacity(
            num_real_tokens, self.num_experts, self.spec.top_k, self.options.capacity_factor
        )

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
        scores = score(logits, self.spec.score_fn)
        kept = expert_choice_assignments(scores, mask, self.capacity(int(mask.sum())))
        return Routing(logits, scores, kept, Assignments.empty(x.device), mask, self.num_experts)
