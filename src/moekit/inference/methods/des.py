"""DES: best-of-N search with the number of routed experts k as a search dimension.

Dynamic Experts Search (DES, #27): varying k at inference gives complementary solution sets, so
each of N sampled trajectories gets its own k from a k-set (N split evenly, round-robin) and keeps
it over every decoding step (the paper's "expert configuration inheritance"); a verifier scores
each trajectory and the best one is kept. Best-of-N at a fixed k is the same search with a
one-element k-set, so the two compare at equal N. k is applied as a routing override
(`RoutingOverride(top_k=k)`, weights renormalised by the router's own rule); the cost is every
trajectory's forward passes and routed assignments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.addressing import require_moe_layers
from moekit.errors import ConfigError, require_int, require_number
from moekit.inference.generate import generate
from moekit.inference.methods.cost import MethodCost
from moekit.routing.override import Overrides, RoutingCapture, RoutingOverride


def model_top_k(model: nn.Module) -> int:
    """The k the model's own routers use (the first MoE layer's)."""
    return require_moe_layers(model, "DES")[0][2].config.router.top_k


def default_k_values(model: nn.Module) -> list[int]:
    """The paper's example k-set around the model's own k₀: {k₀−1, k₀, k₀+1} within [1, E]."""
    layer = require_moe_layers(model, "DES")[0][2]
    k0, experts = layer.config.router.top_k, layer.config.router.num_experts
    return [k for k in (k0 - 1, k0, k0 + 1) if 1 <= k <= experts]


def k_schedule(k_values: Sequence[int], samples: int) -> list[int]:
    """Each trajectory's k: the k-set repeated round-robin, so N is split evenly (DES, #27)."""
    if not k_values:
        raise ConfigError("k_values", "got an empty set, expected at least one k")
    for k in k_values:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError("k_values", f"got {k!r}, expected integers >= 1")
    require_int("samples", samples, minimum=1)
    return [k_values[i % len(k_values)] for i in range(samples)]


@dataclass
class Trajectory:
    k: int
    tokens: Tensor  # prompt + generated tokens [1, S + new]
    score: float
    assignments: int  # routed token-expert pairs this trajectory computed


@dataclass
class DESResult:
    trajectories: list[Trajectory]
    best: int  # index of the highest-scoring trajectory (the first on ties)
    cost: MethodCost = field(default_factory=MethodCost)

    @property
    def tokens(self) -> Tensor:
        return self.trajectories[self.best].tokens


@torch.no_grad()
def des_search(
    model: nn.Module,
    input_ids: Tensor,
    verifier: Callable[[Tensor], float],
    *,
    k_values: Sequence[int] | None = None,
    samples: int = 8,
    max_new_tokens: int = 16,
    do_sample: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
) -> DESResult:
    """Best-of-`samples` over trajectories of one prompt [1, S], trajectory i sampled with seed
    `seed + i` at k = `k_schedule(k_values, samples)[i]` for every step; `verifier` scores a
    trajectory's new tokens [new] (higher is better). `k_values` None: `default_k_values`."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ConfigError("input_ids", f"expected one prompt of shape (1, S), got {tuple(input_ids.shape)}")
    require_number("temperature", temperature, minimum=0.0, strict=True)
    layers = require_moe_layers(model, "DES")
    schedule = k_schedule(default_k_values(model) if k_values is None else list(k_values), samples)
    most = min(layer.config.router.num_experts for _, _, layer in layers)
    if max(schedule) > most:
        raise ConfigError("k_values", f"got k={max(schedule)}, the model's layers have {most} experts")
    cost = MethodCost()
    trajectories = []
    for index, k in enumerate(schedule):
        capture = RoutingCapture()
        out = generate(
            model,
            input_ids,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            seed=seed + index,
            eos_token_id=eos_token_id,
            overrides=Overrides(default=RoutingOverride(top_k=k), capture=capture),
        )
        assignments = sum(int(r.kept.token.numel()) for v in capture.routings.values() for r in v)
        cost.forward_passes += max(out.shape[1] - input_ids.shape[1], 1)
        cost.assignments += assignments
        score = float(verifier(out[0, input_ids.shape[1] :]))
        trajectories.append(Trajectory(k, out, score, assignments))
    best = max(range(len(trajectories)), key=lambda i: (trajectories[i].score, -i))
    return DESResult(trajectories, best, cost)
