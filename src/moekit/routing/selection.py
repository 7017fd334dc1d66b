"""Building blocks the research routers share: from a dense selection to flat assignments and back.

A router that decides per (token, expert) cell (top-p, null experts, Gumbel thresholds, expert
choice) states its decision as a boolean [T, E] mask plus dense weights; `assignments_from_mask`
turns that into the record's flat, expert-sorted `Assignments` with each token's preference rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.capacity import apply_capacity, expert_capacity
from moekit.routing.keysort import stable_sort
from moekit.routing.record import Assignments
from moekit.routing.spec import RouterSpec


def real_tokens(token_mask: Tensor | None, num_tokens: int, device: torch.device) -> Tensor:
    """`token_mask` as bool [T], all true when absent."""
    if token_mask is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    return token_mask.to(torch.bool)


def preference_rank(preference: Tensor, selected: Tensor) -> Tensor:
    """Each selected cell's place among its token's selected experts, best `preference` first, [T, E]
    int64 (unselected cells hold meaningless values). Ties keep the lower expert id first."""
    order = torch.sort(preference, dim=-1, descending=True, stable=True).indices
    rank_in_order = torch.cumsum(selected.gather(1, order).long(), dim=-1) - 1
    return torch.empty_like(rank_in_order).scatter_(1, order, rank_in_order)


def assignments_from_mask(
    selected: Tensor, weights: Tensor, preference: Tensor, token_mask: Tensor
) -> Assignments:
    """The selected (token, expert) cells of real tokens as expert-sorted `Assignments`.

    `selected` [T, E] bool, `weights` [T, E] (differentiable; read at the selected cells only),
    `preference` [T, E] orders each token's experts for `rank`, `token_mask` [T] bool.
    """
    chosen = selected & token_mask.unsqueeze(-1)
    rank = preference_rank(preference.detach(), chosen)
    token, expert = torch.nonzero(chosen, as_tuple=True)
    expert, order = stable_sort(expert, selected.shape[1])
    token = token[order]
    return Assignments(token, expert, weights[token, expert], rank[token, expert])


def split_by_capacity(
    chosen: Assignments,
    spec: RouterSpec,
    num_tokens: int,
    num_compute_experts: int,
    generator: torch.Generator | None = None,
) -> tuple[Assignments, Assignments]:
    """(kept, dropped) under the spec's capacity factor, over the compute experts only (GShard);
    dropless when `spec.capacity_factor` is None. Null experts are never limited."""
    if spec.capacity_factor is None:
        return chosen, Assignments.empty(chosen.token.device)
    compute = int((chosen.expert < num_compute_experts).sum())
    capacity = expert_capacity(compute, num_compute_experts, spec.capacity_factor)
    return apply_capacity(chosen, num_tokens, num_compute_experts, capacity, spec.drop_policy, generator)


def dense_weights(assignments: Assignments, num_tokens: int, num_experts: int) -> Tensor:
    """The assignments' weights scattered into [T, E] (zero elsewhere; repeated pairs add up).
    Differentiable with respect to the weights."""
    out = assignments.weight.new_zeros(num_tokens, num_experts)
    return out.index_put((assignments.token, assignments.expert), assignments.weight, accumulate=True)


def renormalise_selected(weights: Tensor, selected: Tensor, spec: RouterSpec) -> Tensor:
    """The spec's `renorm` and `scaling` applied to dense [T, E] weights that are zero outside
    `selected`; a token with nothing selected keeps all-zero weights (and finite gradients)."""
    out = weights
    if spec.renorm != "none":
        empty = ~selected.any(-1, keepdim=True)
        filled = torch.where(empty, torch.ones_like(weights), weights)
        if spec.renorm == "sum":
            norm = filled.sum(-1, keepdim=True)
        else:
            norm = torch.linalg.vector_norm(filled, ord=spec.renorm_p, dim=-1, keepdim=True)
        out = weights / (norm + spec.renorm_eps)
    if spec.scaling != 1.0:
        out = out * spec.scaling
    return out
