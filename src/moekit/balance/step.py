"""One optimizer step's forward/backward over its micro-batches, normalised over the global batch.

`accumulate_gradients` makes every objective independent of how the global batch is split into
gradient-accumulation micro-batches and data/expert-parallel ranks (moe-systems.md P1, P2):

- Every normaliser is global and known before any forward: real tokens N, LM target tokens,
  sequences, non-empty micro-batches, summed over this rank's micro-batches and all-reduced.
  Each micro-batch backpropagates its *share* (its sum divided by the global normaliser), so the
  gradients accumulated over micro-batches and summed over ranks are the gradient of the global loss.
- The global-batch LBL needs f_i from the whole global batch before any backward. With several
  micro-batches per rank a no-grad counting pass runs first (with the RNG state restored, so the
  routing is the same), and its counts are all-reduced; with one micro-batch per rank the counts of
  the forward itself are all-reduced before the loss is formed. The counts of the real pass are
  checked against the counting pass afterwards.
- The expert counts for DeepSeek-V3's bias update are summed over the step's micro-batches and
  all-reduced; `apply_bias_updates(model, report.expert_counts, rate)` applies them once.

Gradients are left in `.grad` for the caller's optimizer. Across ranks the per-rank gradients must
be **summed**, not averaged (each rank already divides by global counts): with DDP, register a
summing communication hook or multiply the loss by the world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from moekit.balance.collective import all_reduce_max, all_reduce_sum
from moekit.balance.config import BalanceConfig, ObjectiveSpec
from moekit.balance.diagnostics import BalanceDiagnostics, diagnose_stats
from moekit.balance.objectives import (
    deepseek_sequence_aux_loss,
    global_batch_load_balancing_loss,
    router_z_loss,
    routing_entropy_loss,
    switch_load_balancing_loss,
)
from moekit.balance.stats import RoutingStats, SequenceStats, sequence_index
from moekit.errors import MoekitError
from moekit.routing.record import Routing


class MicroBatch(Protocol):
    """What `accumulate_gradients` reads from a micro-batch before running it.

    - `token_mask` [..., L] bool: the tokens the MoE layers route (false = padding); the forward
      must pass this very mask to every MoE layer.
    - `num_loss_tokens`: target tokens of the LM loss.
    - `doc_ids` (optional attribute, same shape as `token_mask`): the document of each token in a
      packed row; without it every row is one sequence.
    """

    token_mask: Tensor
    num_loss_tokens: int


@dataclass(frozen=True)
class ForwardOutput:
    """What `forward_fn(micro_batch)` returns: the LM loss summed over the micro-batch's target
    tokens (not averaged) and one `Routing` per MoE layer, in module order."""

    loss_sum: Tensor
    routings: Sequence[Routing]


@dataclass(frozen=True)
class BatchTotals:
    """Normalisers of the global batch (all micro-batches of the step, all ranks)."""

    num_tokens: int  # real (routed) tokens
    num_loss_tokens: int  # LM target tokens
    num_sequences: int  # sequences (documents of packed rows)
    num_micro_batches: int  # micro-batches holding at least one real token
    max_micro_batches_per_rank: int


@dataclass(frozen=True)
class StepReport:
    """The step's global objective values (floats, identical on every rank) and diagnostics.

    - `loss`: `lm_loss` + Σ coefficient × objective: the value whose gradient was accumulated.
    - `objectives`: each objective's unweighted value summed over MoE layers, by `kind/scope`;
      `layer_objectives` the same per layer.
    - `expert_counts`: per layer, int64 [E] chosen assignments over the global batch, for
      `apply_bias_updates`.
    - `counting_pass`: whether a no-grad counting pass ran (global LBL with accumulation).
    """

    loss: float
    lm_loss: float
    objectives: dict[str, float]
    coefficients: dict[str, float]
    layer_objectives: list[dict[str, float]]
    diagnostics: list[BalanceDiagnostics]
    expert_counts: list[Tensor]
    totals: BatchTotals
    counting_pass: bool

    def log_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat `name: value` pairs for a metrics logger."""
        out = {f"{prefix}loss": self.loss, f"{prefix}lm_loss": self.lm_loss}
        out.update({f"{prefix}{name}": value for name, value in self.objectives.items()})
        for layer, diagnostics in enumerate(self.diagnostics):
            out.update({f"{prefix}layer{layer}/{k}": v for k, v in diagnostics.to_dict().items()})
        return out


def accumulate_gradients(
    forward_fn: Callable[[MicroBatch], ForwardOutput],
    micro_batches: Iterable[MicroBatch],
    config: BalanceConfig,
    step: int,
    group: object | None = None,
) -> StepReport:
    """Run forward and backward on this rank's micro-batches for optimizer step `step`.

    `group` is the process group spanning the data/expert-parallel ranks that share the global
    batch (None: this process holds the whole global batch). Every rank must call this with the
    same config and step, at least one micro-batch each, and the same number of MoE layers.
    """
    batches = list(micro_batches)
    if not batches:
        raise MoekitError("micro_batches: expected at least one micro-batch on every rank")
    sequences = [sequence_index(mb.token_mask, getattr(mb, "doc_ids", None)) for mb in batches]
    totals = _global_totals(batches, sequences, group)
    coefficients = config.coefficients(step)
    needs_global_counts = any(
        spec.kind == "load_balance" and spec.scope == "global" and coefficients[spec.name] != 0
        for spec in config.objectives
    )
    needs_sequences = any(spec.scope == "sequence" for spec in config.objectives)
    counting_pass = needs_global_counts and totals.max_micro_batches_per_rank > 1
    global_counts = _count_chosen(forward_fn, batches, group) if counting_pass else None

    summed: list[RoutingStats] = []
    shares: dict[tuple[int, str], Tensor] = {}
    lm_sum = torch.zeros((), dtype=torch.float64)
    for mb, (index, num_sequences) in zip(batches, sequences, strict=True):
        output = forward_fn(mb)
        routings = _checked_routings(output, mb, len(summed) if summed else None)
        total = output.loss_sum / max(totals.num_loss_tokens, 1)
        lm_sum += output.loss_sum.detach().to(torch.float64).cpu()
        stats = [RoutingStats.from_routing(r) for r in routings]
        counts_for_f = global_counts
        if needs_global_counts and not counting_pass:
            counts_for_f = [all_reduce_sum(s.chosen_counts, group) for s in stats]
        for layer, (routing, layer_stats) in enumerate(zip(routings, stats, strict=True)):
            seq_stats = SequenceStats.from_routing(routing, index, num_sequences) if needs_sequences else None
            for spec in config.objectives:
                f_counts = None if counts_for_f is None else counts_for_f[layer]
                share = _objective_share(spec, layer_stats, seq_stats, f_counts, totals)
                if share is None:
                    continue
                if not (spec.kind == "load_balance" and spec.scope == "global"):
                    key = (layer, spec.name)
                    shares[key] = shares.get(key, 0) + share.detach().to(torch.float64).cpu()
                if coefficients[spec.name] != 0:
                    total = total + coefficients[spec.name] * share
            detached = layer_stats.detach()
            if len(summed) <= layer:
                summed.append(detached)
            else:
                summed[layer] = summed[layer] + detached
        if total.requires_grad:
            total.backward()

    reduced = [s.all_reduced(group) for s in summed]
    if global_counts is not None:
        for layer, (counted, seen) in enumerate(zip(global_counts, reduced, strict=True)):
            if not torch.equal(counted, seen.chosen_counts):
                raise MoekitError(
                    f"MoE layer {layer}: the routing of the backward pass differs from the counting pass; "
                    "forward_fn must route identically given the same torch RNG state"
                )
    return _report(config, coefficients, totals, reduced, shares, lm_sum, group, counting_pass)


def _global_totals(
    batches: list[MicroBatch], sequences: list[tuple[Tensor, int]], group: object | None
) -> BatchTotals:
    real = [int(mb.token_mask.to(torch.bool).sum()) for mb in batches]
    local = torch.tensor(
        [
            sum(real),
            sum(int(mb.num_loss_tokens) for mb in batches),
            sum(n for _, n in sequences),
            sum(1 for n in real if n > 0),
        ],
        dtype=torch.int64,
    )
    tokens, loss_tokens, num_sequences, non_empty = (int(v) for v in all_reduce_sum(local, group))
    most = int(all_reduce_max(torch.tensor([len(batches)], dtype=torch.int64), group)[0])
    return BatchTotals(tokens, loss_tokens, num_sequences, non_empty, most)


def _checked_routings(output: ForwardOutput, mb: MicroBatch, num_layers: int | None) -> Sequence[Routing]:
    """The routings of `output`, after checking that each was made with the micro-batch's mask."""
    if not isinstance(output, ForwardOutput):
        raise MoekitError(f"forward_fn: expected a ForwardOutput, got {type(output).__name__}")
    routings = output.routings
    if num_layers is not None and len(routings) != num_layers:
        raise MoekitError(
            f"forward_fn: returned {len(routings)} routings, expected {num_layers} (one per MoE layer)"
        )
    mask = mb.token_mask.reshape(-1).to(torch.bool)
    for layer, routing in enumerate(routings):
        if routing.num_tokens != mask.numel() or not torch.equal(
            routing.token_mask.to(torch.bool), mask.to(routing.token_mask.device)
        ):
            raise MoekitError(
                f"forward_fn: MoE layer {layer} routed with a token mask other than micro_batch.token_mask; "
                "pass the micro-batch's token_mask to every MoE layer so padding is never routed or counted"
            )
    return routings


def _count_chosen(
    forward_fn: Callable[[MicroBatch], ForwardOutput], batches: list[MicroBatch], group: object | None
) -> list[Tensor]:
    """Chosen-assignment counts per layer over the global batch, from a no-grad forward of every
    micro-batch; the torch RNG state is restored afterwards so the real pass routes identically."""
    counts: list[Tensor] = []
    with torch.random.fork_rng(), torch.no_grad():
        for mb in batches:
            routings = _checked_routings(forward_fn(mb), mb, len(counts) if counts else None)
            chosen = [r.chosen_counts for r in routings]
            counts = chosen if not counts else [a + b for a, b in zip(counts, chosen, strict=True)]
    return [all_reduce_sum(c, group) for c in counts]


def _objective_share(
    spec: ObjectiveSpec,
    stats: RoutingStats,
    seq: SequenceStats | None,
    global_counts: Tensor | None,
    totals: BatchTotals,
) -> Tensor | None:
    """This micro-batch's share of one layer's objective: the shares of all micro-batches and ranks
    add up to the objective over the global batch. None for the global LBL when f is not known."""
    nce = stats.num_compute_experts
    local_tokens = int(stats.num_tokens)
    if spec.kind == "load_balance":
        if spec.scope == "global":
            if global_counts is None:
                return None
            return global_batch_load_balancing_loss(global_counts, stats.prob_sums, totals.num_tokens, nce)
        if spec.scope == "sequence":
            return deepseek_sequence_aux_loss(
                seq.chosen_counts, seq.prob_sums, seq.num_tokens, max(totals.num_sequences, 1), nce
            )
        if local_tokens == 0:
            return stats.prob_sums.sum() * 0
        loss = switch_load_balancing_loss(stats.chosen_counts, stats.prob_sums, local_tokens, nce)
        return loss / totals.num_micro_batches
    token_mean = router_z_loss if spec.kind == "z_loss" else routing_entropy_loss
    if spec.scope == "global":
        total_sum = stats.z_sum if spec.kind == "z_loss" else stats.entropy_sum
        return token_mean(total_sum, totals.num_tokens)
    if spec.scope == "sequence":
        sums = seq.z_sums if spec.kind == "z_loss" else seq.entropy_sums
        per_sequence = token_mean(sums, seq.num_tokens)
        return per_sequence.sum() / max(totals.num_sequences, 1)
    if local_tokens == 0:
        return stats.prob_sums.sum() * 0
    total_sum = stats.z_sum if spec.kind == "z_loss" else stats.entropy_sum
    return token_mean(total_sum, local_tokens) / totals.num_micro_batches


def _report(
    config: BalanceConfig,
    coefficients: dict[str, float],
    totals: BatchTotals,
    reduced: list[RoutingStats],
    shares: dict[tuple[int, str], Tensor],
    lm_sum: Tensor,
    group: object | None,
    counting_pass: bool,
) -> StepReport:
    """Global values: shares summed over ranks; the global LBL recomputed from reduced statistics."""
    keys = sorted(shares)
    summed_shares = all_reduce_sum(torch.stack([shares[k] for k in keys]), group) if keys else torch.zeros(0)
    values = {key: float(v) for key, v in zip(keys, summed_shares, strict=True)}
    lm_loss = float(all_reduce_sum(lm_sum, group)) / max(totals.num_loss_tokens, 1)
    layer_objectives: list[dict[str, float]] = []
    for layer, stats in enumerate(reduced):
        per_layer = {}
        for spec in config.objectives:
            if spec.kind == "load_balance" and spec.scope == "global":
                value = global_batch_load_balancing_loss(
                    stats.chosen_counts, stats.prob_sums, totals.num_tokens, stats.num_compute_experts
                )
                per_layer[spec.name] = float(value)
            else:
                per_layer[spec.name] = values[(layer, spec.name)]
        layer_objectives.append(per_layer)
    objectives = {
        spec.name: sum(layer[spec.name] for layer in layer_objectives) for spec in config.objectives
    }
    loss = lm_loss + sum(coefficients[name] * value for name, value in objectives.items())
    return StepReport(
        loss=loss,
        lm_loss=lm_loss,
        objectives=objectives,
        coefficients=coefficients,
        layer_objectives=layer_objectives,
        diagnostics=[diagnose_stats(stats) for stats in reduced],
        expert_counts=[stats.chosen_counts for stats in reduced],
        totals=totals,
        counting_pass=counting_pass,
    )
