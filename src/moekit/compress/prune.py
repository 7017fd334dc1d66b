"""Expert pruning: score every expert of every layer from the calibration, keep the best."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.analysis.recorder import find_moe_layers
from moekit.compress import scores
from moekit.compress.calibrate import Calibration, ExpertStats
from moekit.compress.surgery import select_rows
from moekit.errors import ConfigError, MoekitError, require_choice


def expert_scores(method: str, stats: ExpertStats, router_weight: Tensor, keep: int) -> Tensor:
    """[E] saliency of one layer's experts under `method` (see `scores`)."""
    require_choice("prune.score", method, scores.SCORES)
    if method == "frequency":
        return scores.frequency(stats.count, stats.tokens)
    if method == "gate_weight":
        return scores.gate_weight(stats.gate_sum, stats.tokens)
    if method == "reap":
        return scores.reap(stats.reap_sum, stats.count)
    if method == "ean":
        return scores.ean(stats.norm_sum)
    return scores.stun_representatives(router_weight, keep)


def top_experts(score: Tensor, keep: int, num_groups: int = 1, protect: Tensor | None = None) -> Tensor:
    """Sorted indices of the `keep` highest-scoring experts (ties: lower index first). Under
    group-limited routing each of the `num_groups` contiguous groups keeps `keep / num_groups`, so
    the pruned router's groups stay equal; `protect` (bool [E]) experts are kept first."""
    num = score.numel()
    if keep % num_groups:
        raise ConfigError(
            "prune.keep", f"{keep} experts do not split evenly into the router's {num_groups} groups"
        )
    ranked = score.double().clone()
    if protect is not None:
        ranked[protect] = float("inf")
    per_group, group_size = keep // num_groups, num // num_groups
    kept = []
    for g in range(num_groups):
        part = ranked[g * group_size : (g + 1) * group_size]
        order = sorted(range(group_size), key=lambda i: (-float(part[i]), i))[:per_group]
        kept += [g * group_size + i for i in order]
    return torch.tensor(sorted(kept), dtype=torch.long)


def resolve_keep(keep: float | int, num_experts: int, top_k: int, field: str = "keep") -> int:
    """Experts to keep per layer from a count (int) or a fraction in (0, 1]."""
    count = round(keep * num_experts) if isinstance(keep, float) else int(keep)
    if count > num_experts:
        raise ConfigError(field, f"got {keep}, the model has only {num_experts} experts per layer")
    if count < top_k:
        raise ConfigError(field, f"got {keep} ({count} experts), fewer than the router's top_k={top_k}")
    return count


def resolve_counts(
    keep: float | int | list[int] | tuple[int, ...], spec: Any, num_layers: int, field: str = "prune.keep"
) -> list[int] | None:
    """Per-layer counts from an explicit list (checked against the router), or None for one
    count everywhere."""
    from moekit.compress.padding import minimum_count

    if not isinstance(keep, (list, tuple)):
        return None
    if len(keep) != num_layers:
        raise ConfigError(field, f"got {len(keep)} counts, the model has {num_layers} MoE layers")
    least = minimum_count(spec)
    for i, count in enumerate(keep):
        resolve_keep(int(count), spec.num_experts, spec.top_k, f"{field}[{i}]")
        if count < least or count % spec.num_groups:
            raise ConfigError(
                f"{field}[{i}]",
                f"got {count}; this router needs at least {least} experts in multiples of its "
                f"{spec.num_groups} groups",
            )
    return [int(c) for c in keep]


@dataclass
class PruneResult:
    model: nn.Module
    keep: list[Tensor]  # per layer, the kept original expert indices
    scores: list[Tensor]
    padding: Any = None  # a `padding.Padded` when the layers keep different counts


def prune(
    model: nn.Module,
    calibration: Calibration,
    method: str,
    keep: float | int | list[int],
    protect: list[Tensor] | None = None,
    allocation: str = "uniform",
    padding: str | None = None,
) -> PruneResult:
    """The model with, in every MoE layer, the `keep` experts of highest `method` saliency.

    `keep` may list a count per MoE layer, or `allocation="global"` shares the total budget
    (`keep` per layer times the layers) between layers by saliency (`padding.allocate_counts`).
    Different counts are stored padded to the largest (`padding.pad`; `padding` forces a mode)."""
    from moekit.compress.padding import allocate_counts, minimum_count, pad

    layers = find_moe_layers(model)
    if len(layers) != len(calibration.layers):
        raise MoekitError("prune: the calibration does not belong to this model (layer count differs)")
    spec = layers[0][1].config.router
    counts = resolve_counts(keep, spec, len(layers))
    if counts is None:
        count = resolve_keep(keep, spec.num_experts, spec.top_k, "prune.keep")
        counts = [count] * len(layers)
    if allocation == "global":
        if method == "stun":
            raise ConfigError(
                "prune.allocation", "global allocation needs a saliency; stun only ranks within a layer"
            )
        if isinstance(keep, (list, tuple)):
            raise ConfigError("prune.allocation", "global allocation takes one keep count or fraction")
    all_scores = [
        expert_scores(method, stats, moe.router.weight, c)
        for (_, moe), stats, c in zip(layers, calibration.layers, counts, strict=True)
    ]
    if allocation == "global":
        counts = allocate_counts(all_scores, sum(counts), minimum_count(spec), spec.num_groups)
    kept = [
        top_experts(score, c, spec.num_groups, None if protect is None else protect[i])
        for i, (score, c) in enumerate(zip(all_scores, counts, strict=True))
    ]
    if len(set(counts)) == 1 and padding is None:
        return PruneResult(select_rows(model, kept), kept, all_scores)
    padded = pad(model, kept, all_scores, padding)
    return PruneResult(padded.model, kept, all_scores, padded)
