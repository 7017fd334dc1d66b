"""Per-layer balance diagnostics for logging: is the router collapsing, starving or dropping?

The *load* of an expert is the number of assignments it processed (kept after capacity), over
compute experts only (null experts cost nothing, so they carry no load). Undefined ratios (no
load at all) are NaN rather than a made-up number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from moekit.balance.stats import RoutingStats
from moekit.routing.record import Routing


def load_cv(load: Tensor) -> float:
    """Coefficient of variation of the expert loads, std/mean (population std); 0 = perfectly even."""
    load = load.to(torch.float64)
    mean = load.mean()
    if load.numel() == 0 or mean == 0:
        return float("nan")
    return float(load.std(correction=0) / mean)


def max_over_mean_load(load: Tensor) -> float:
    """The busiest expert's load over the mean load; 1 = even, E = everything on one expert."""
    load = load.to(torch.float64)
    if load.numel() == 0 or load.mean() == 0:
        return float("nan")
    return float(load.max() / load.mean())


def dead_experts(load: Tensor) -> int:
    """Experts that processed no token."""
    return int((load == 0).sum())


def drop_rate(chosen_counts: Tensor, kept_counts: Tensor) -> float:
    """The fraction of chosen assignments removed by capacity; 0 when nothing was chosen."""
    chosen = int(chosen_counts.sum())
    return 0.0 if chosen == 0 else (chosen - int(kept_counts.sum())) / chosen


@dataclass(frozen=True)
class BalanceDiagnostics:
    """One layer's balance at a glance. `router_entropy` is the mean token entropy (nats) of the
    routing distribution: log(E) is uniform indifference, 0 a one-hot router."""

    load_cv: float
    max_over_mean_load: float
    dead_experts: int
    router_entropy: float
    drop_rate: float
    num_tokens: int

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def diagnose_stats(stats: RoutingStats) -> BalanceDiagnostics:
    """Diagnostics from (possibly summed and all-reduced) routing statistics."""
    load = stats.kept_counts[: stats.num_compute_experts]
    num_tokens = int(stats.num_tokens)
    entropy = float(stats.entropy_sum) / num_tokens if num_tokens else float("nan")
    return BalanceDiagnostics(
        load_cv=load_cv(load),
        max_over_mean_load=max_over_mean_load(load),
        dead_experts=dead_experts(load),
        router_entropy=entropy,
        drop_rate=drop_rate(stats.chosen_counts, stats.kept_counts),
        num_tokens=num_tokens,
    )


def diagnose(routing: Routing) -> BalanceDiagnostics:
    """Diagnostics of one layer's routing over its real tokens."""
    with torch.no_grad():
        return diagnose_stats(RoutingStats.from_routing(routing))
