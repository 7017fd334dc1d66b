"""Expert capacity and which assignments it drops.

Dropless is the default. With a capacity factor c, each compute expert keeps at most
ceil(c * A / E) of the A assignments routed to the E compute experts (GShard/Switch). A dropped
assignment contributes zero to its token's output; the residual path still carries the token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.routing.record import Assignments


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    """GShard/Switch expert capacity: ceil(capacity_factor * assignments / experts)."""
    return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


def priority_key(
    assignments: Assignments, policy: str, num_tokens: int, generator: torch.Generator | None = None
) -> Tensor:
    """Lower key = kept first.

    - `position`: a token's first choices before anyone's second (GShard), then sequence order.
    - `score`: the highest routing weight first (Megatron's "probs").
    - `random`: a random order (random token selection, RTS).
    """
    if policy == "position":
        return assignments.rank * num_tokens + assignments.token
    if policy == "score":
        return -assignments.weight.detach().double()
    if policy == "random":
        count = len(assignments)
        return torch.randperm(count, generator=generator, device=assignments.token.device)
    raise ValueError(f"unknown drop policy {policy!r}")


def apply_capacity(
    assignments: Assignments,
    num_tokens: int,
    num_compute_experts: int,
    capacity: int,
    policy: str,
    generator: torch.Generator | None = None,
) -> tuple[Assignments, Assignments]:
    """Split assignments into (kept, dropped); experts >= num_compute_experts are never limited."""
    if len(assignments) == 0:
        return assignments, assignments
    key = priority_key(assignments, policy, num_tokens, generator)
    by_key = torch.argsort(key, stable=True)
    order = by_key[torch.argsort(assignments.expert[by_key], stable=True)]
    experts_in_order = assignments.expert[order]
    counts = torch.bincount(experts_in_order, minlength=int(experts_in_order.max()) + 1)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(assignments), device=order.device) - starts[experts_in_order]
    keep_in_order = (position < capacity) | (experts_in_order >= num_compute_experts)
    keep = torch.empty_like(keep_in_order)
    keep[order] = keep_in_order
    return assignments.select(keep), assignments.select(~keep)
