"""Routing statistics over real tokens, in a form that adds across micro-batches and ranks.

Every balancing objective is a function of a few sums: per-expert assignment counts (int64, so
they are exact however many micro-batches and ranks are added), per-expert sums of routing
probabilities (differentiable), per-token z-loss and entropy sums, and the number of real tokens.
Padding tokens (token_mask false) are left out of every one of them. `RoutingStats` holds the
sums for a batch, `SequenceStats` the same per sequence (a packed row's documents counted apart).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.balance.collective import all_reduce_sum
from moekit.balance.objectives import router_z_per_token, routing_entropy_per_token
from moekit.errors import MoekitError
from moekit.routing.record import Routing


def routing_probabilities(routing: Routing) -> Tensor:
    """p_{t,i}: the router's scores over all experts, normalised to sum to one per token, [T, E].

    Softmax scores are returned (re-normalised, a no-op up to rounding); sigmoid scores become
    DeepSeek-V3's s'_{i,t} = s_{i,t} / Σ_j s_{j,t}. A router without a score function (raw logits,
    which the router returns as the scores tensor itself) gets softmax(logits).
    """
    scores, logits = routing.scores, routing.logits
    if scores.numel() and scores.data_ptr() == logits.data_ptr():
        return torch.softmax(logits, dim=-1)
    return scores / scores.sum(-1, keepdim=True)


def _chosen(routing: Routing) -> tuple[Tensor, Tensor]:
    """(token, expert) of every assignment the router chose, kept or dropped by capacity."""
    return (
        torch.cat([routing.kept.token, routing.dropped.token]),
        torch.cat([routing.kept.expert, routing.dropped.expert]),
    )


@dataclass(frozen=True)
class RoutingStats:
    """One MoE layer's routing sums over the real tokens of a batch.

    - `chosen_counts` [E] int64: assignments the router chose (before capacity dropping).
    - `kept_counts` [E] int64: assignments expert compute processed.
    - `prob_sums` [E]: Σ_t p_{t,i} (differentiable with respect to the router).
    - `z_sum`, `entropy_sum` []: Σ_t of the z-loss and routing-entropy summands (differentiable).
    - `num_tokens` [] int64: real tokens.
    """

    chosen_counts: Tensor
    kept_counts: Tensor
    prob_sums: Tensor
    z_sum: Tensor
    entropy_sum: Tensor
    num_tokens: Tensor
    num_compute_experts: int

    @staticmethod
    def from_routing(routing: Routing) -> RoutingStats:
        real = routing.token_mask.to(torch.bool)
        probs = routing_probabilities(routing)[real]
        return RoutingStats(
            chosen_counts=routing.chosen_counts,
            kept_counts=routing.counts,
            prob_sums=probs.sum(0),
            z_sum=router_z_per_token(routing.logits[real]).sum(),
            entropy_sum=routing_entropy_per_token(probs).sum(),
            num_tokens=real.sum(),
            num_compute_experts=routing.num_compute_experts,
        )

    @property
    def num_experts(self) -> int:
        return int(self.chosen_counts.shape[0])

    def __add__(self, other: RoutingStats) -> RoutingStats:
        if other.num_experts != self.num_experts or other.num_compute_experts != self.num_compute_experts:
            raise MoekitError(
                f"routing stats: cannot add {other.num_experts} experts "
                f"({other.num_compute_experts} compute) to {self.num_experts} ({self.num_compute_experts})"
            )
        return RoutingStats(
            self.chosen_counts + other.chosen_counts,
            self.kept_counts + other.kept_counts,
            self.prob_sums + other.prob_sums,
            self.z_sum + other.z_sum,
            self.entropy_sum + other.entropy_sum,
            self.num_tokens + other.num_tokens,
            self.num_compute_experts,
        )

    def detach(self) -> RoutingStats:
        return RoutingStats(
            self.chosen_counts,
            self.kept_counts,
            self.prob_sums.detach(),
            self.z_sum.detach(),
            self.entropy_sum.detach(),
            self.num_tokens,
            self.num_compute_experts,
        )

    def all_reduced(self, group: object | None) -> RoutingStats:
        """The sums over every rank of `group` (None: this process only), without gradient."""
        return RoutingStats(
            all_reduce_sum(self.chosen_counts, group),
            all_reduce_sum(self.kept_counts, group),
            all_reduce_sum(self.prob_sums, group),
            all_reduce_sum(self.z_sum, group),
            all_reduce_sum(self.entropy_sum, group),
            all_reduce_sum(self.num_tokens, group),
            self.num_compute_experts,
        )


def sequence_index(token_mask: Tensor, doc_ids: Tensor | None = None) -> tuple[Tensor, int]:
    """(sequence number of every token [T] int64, −1 for padding; number of sequences S).

    `token_mask` has shape [..., L] (rows of L tokens, flattened in order like the MoE layer does).
    Without `doc_ids` each row holding a real token is one sequence; with `doc_ids` (same shape;
    packed rows) each (row, document id) pair is one, so ids may restart in every row. Sequences
    are numbered in row order, then document-id order.
    """
    mask = token_mask.to(torch.bool)
    if mask.dim() == 0:
        raise MoekitError("token_mask: expected shape [..., seq_len], got a scalar")
    rows = mask.reshape(-1, mask.shape[-1])
    num_rows, row_len = rows.shape
    key = torch.arange(num_rows, device=mask.device).unsqueeze(1).expand(num_rows, row_len)
    if doc_ids is not None:
        if doc_ids.shape != token_mask.shape:
            raise MoekitError(
                f"doc_ids: expected the token mask's shape {tuple(token_mask.shape)}, "
                f"got {tuple(doc_ids.shape)}"
            )
        docs = doc_ids.reshape(num_rows, row_len).to(torch.long)
        real_docs = docs[rows]
        if real_docs.numel() and int(real_docs.min()) < 0:
            raise MoekitError("doc_ids: real tokens (token_mask true) need document ids >= 0")
        span = int(real_docs.max()) + 1 if real_docs.numel() else 1
        key = key * span + docs
    flat_mask = rows.reshape(-1)
    unique, inverse = torch.unique(key.reshape(-1)[flat_mask], return_inverse=True)
    index = torch.full((flat_mask.numel(),), -1, dtype=torch.long, device=mask.device)
    index[flat_mask] = inverse
    return index, int(unique.numel())


@dataclass(frozen=True)
class SequenceStats:
    """One MoE layer's routing sums per sequence: `chosen_counts`, `prob_sums` [S, E], `z_sums`,
    `entropy_sums` [S], `num_tokens` [S] int64 (each over the sequence's real tokens)."""

    chosen_counts: Tensor
    prob_sums: Tensor
    z_sums: Tensor
    entropy_sums: Tensor
    num_tokens: Tensor
    num_compute_experts: int

    @staticmethod
    def from_routing(routing: Routing, index: Tensor, num_sequences: int) -> SequenceStats:
        """Per-sequence sums, `index` [T] being `sequence_index(...)[0]` for the routed tokens."""
        if index.shape != (routing.num_tokens,):
            raise MoekitError(
                f"sequence index: expected one entry per routed token ({routing.num_tokens}), "
                f"got shape {tuple(index.shape)}"
            )
        num_experts = routing.num_experts
        real = routing.token_mask.to(torch.bool) & (index >= 0)
        seq = index[real]
        probs = routing_probabilities(routing)[real]
        dtype = probs.dtype
        token, expert = _chosen(routing)
        if token.numel() and int(index[token].min()) < 0:
            raise MoekitError(
                "sequence index: a routed token has no sequence; build the index from the same token_mask"
            )
        counts = torch.bincount(index[token] * num_experts + expert, minlength=num_sequences * num_experts)
        zeros = torch.zeros(num_sequences, dtype=dtype, device=probs.device)
        return SequenceStats(
            chosen_counts=counts.view(num_sequences, num_experts),
            prob_sums=torch.zeros(num_sequences, num_experts, dtype=dtype, device=probs.device).index_add(
                0, seq, probs
            ),
            z_sums=zeros.index_add(0, seq, router_z_per_token(routing.logits[real])),
            entropy_sums=zeros.index_add(0, seq, routing_entropy_per_token(probs)),
            num_tokens=torch.bincount(seq, minlength=num_sequences),
            num_compute_experts=routing.num_compute_experts,
        )
