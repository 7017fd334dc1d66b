"""The routing record: the one currency between router, dispatch, objectives and analysis.

A router turns hidden states into a `Routing`; dispatch spends its kept assignments on expert
compute; balancing objectives read its scores and counts; the analysis recorder stores it.
Every routing scheme (top-k, top-p, null experts, expert-choice, capacity dropping) is expressed
as flat assignments, so none of them changes the record's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cache

import torch
from torch import Tensor

from moekit.routing.keysort import RADIX_KEY_LIMIT, sort_cells

# The padding sentinel under torch.compile: past any expert id without reading the ids on the host.
COMPILED_SENTINEL = 2**62


@dataclass(frozen=True)
class Assignments:
    """Flat (token, expert, weight) triples, sorted by expert (stable in token order within one).

    `rank` is the assignment's place in its token's preference order (0 = the token's best
    expert); for expert-choice routing it is the place in the expert's own order.
    """

    token: Tensor  # [A] int64
    expert: Tensor  # [A] int64, non-decreasing
    weight: Tensor  # [A] fp32, differentiable with respect to the router
    rank: Tensor  # [A] int64

    def __len__(self) -> int:
        return int(self.token.numel())

    def counts(self, num_experts: int) -> Tensor:
        """Assignments per expert, int64 [num_experts]."""
        return torch.bincount(self.expert, minlength=num_experts)

    def select(self, keep: Tensor) -> Assignments:
        """The subset where `keep` (bool [A]) is true; order is preserved, so it stays sorted."""
        return Assignments(self.token[keep], self.expert[keep], self.weight[keep], self.rank[keep])

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> Assignments:
        """No assignments (a router's empty `dropped`): the same empty tensors every call, which
        a decoding step would otherwise allocate in every layer."""
        return _empty_assignments(torch.device(device))

    @staticmethod
    def from_dense(
        topk_index: Tensor,
        topk_weight: Tensor,
        token_mask: Tensor | None = None,
        num_experts: int | None = None,
    ) -> Assignments:
        """Group [T, k] top-k choices by expert; tokens where `token_mask` is false get none.
        `num_experts`: a bound on the expert ids (the width of the scores the choices were taken
        from), which lets the grouping run as a counting sort (`routing.keysort`).

        One stable sort does the grouping: masked tokens' choices get a sentinel expert id past
        the last expert, so they sort to the end and are cut off. Without a mask every shape is
        static, as `torch.compile` with `fullgraph=True` needs; with one, the number of real tokens
        is read on the host (a graph break under compile).
        """
        num_tokens, k = topk_index.shape
        expert = topk_index
        kept = num_tokens * k
        num_keys = num_experts
        if token_mask is not None:
            # past every expert id; RADIX_KEY_LIMIT where that is enough, for the radix sort
            if torch.compiler.is_compiling():
                sentinel = COMPILED_SENTINEL
            elif num_experts is not None:
                sentinel = num_experts
                num_keys = num_experts + 1
            elif expert.numel():
                sentinel = max(RADIX_KEY_LIMIT, int(expert.max()) + 1)
            else:
                sentinel = RADIX_KEY_LIMIT
            expert = expert.masked_fill(~token_mask.unsqueeze(1), sentinel)
            kept = int(token_mask.sum()) * k
        expert, order, token, rank = sort_cells(expert, num_keys)
        if kept < len(order):  # (no slicing where every choice is kept: fewer ops per decode step)
            expert, order, token, rank = expert[:kept], order[:kept], token[:kept], rank[:kept]
        return Assignments(
            token=token, expert=expert, weight=topk_weight.reshape(-1).index_select(0, order), rank=rank
        )


@cache
def _empty_assignments(device: torch.device) -> Assignments:
    with torch.inference_mode(False):  # ordinary tensors, usable in training after a generation
        idx = torch.zeros(0, dtype=torch.long, device=device)  # empty: safe to share
        return Assignments(idx, idx, torch.zeros(0, device=device), idx)


@dataclass(frozen=True)
class Routing:
    """What one MoE layer decided for T tokens over E experts.

    - `logits` [T, E] fp32: the router's raw output.
    - `scores` [T, E] fp32: the score function over every expert, without the selection bias;
      what balancing objectives average (softmax probabilities, sigmoid affinities, ...).
    - `kept`: assignments that expert compute will process, grouped by expert.
    - `dropped`: assignments the router chose but capacity removed; they contribute zero and the
      residual path carries their tokens.
    - `token_mask` [T] bool: true for real tokens; padding gets no assignments and is left out of
      every statistic.
    - `num_compute_experts`: experts with an index at or above it cost nothing (null experts);
      dispatch skips them but objectives still see them.
    - `extras`: router-specific tensors (for example a recurrent router's state), by name.
    """

    logits: Tensor
    scores: Tensor
    kept: Assignments
    dropped: Assignments
    token_mask: Tensor
    num_compute_experts: int
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.logits.shape[1])

    @property
    def counts(self) -> Tensor:
        """Kept assignments per expert, int64 [E] (null experts included)."""
        return self.kept.counts(self.num_experts)

    @property
    def chosen_counts(self) -> Tensor:
        """Assignments per expert before capacity dropping, int64 [E]."""
        return self.counts + self.dropped.counts(self.num_experts)

    @property
    def compute_assignments(self) -> Assignments:
        """Kept assignments to experts that cost compute (null experts removed)."""
        if self.num_compute_experts >= self.num_experts:
            return self.kept
        return self.kept.select(self.kept.expert < self.num_compute_experts)

    def experts_per_token(self, compute_only: bool = True) -> Tensor:
        """Kept experts per token, int64 [T] (real experts only unless `compute_only` is false)."""
        kept = self.compute_assignments if compute_only else self.kept
        return torch.bincount(kept.token, minlength=self.num_tokens)

    def top1_expert(self) -> Tensor:
        """Each token's most preferred chosen expert (kept or dropped), int64 [T]; -1 if none."""
        top = torch.full((self.num_tokens,), -1, dtype=torch.long, device=self.logits.device)
        for part in (self.dropped, self.kept):
            first = part.rank == 0
            top[part.token[first]] = part.expert[first]
        return top

    def detach(self) -> Routing:
        """A copy with no autograd history, for recording and analysis."""
        kept = replace(self.kept, weight=self.kept.weight.detach())
        dropped = replace(self.dropped, weight=self.dropped.weight.detach())
        return replace(
            self,
            logits=self.logits.detach(),
            scores=self.scores.detach(),
            kept=kept,
            dropped=dropped,
            extras={k: v.detach() for k, v in self.extras.items()},
        )
