"""Chain-of-experts (Wang et al. 2025, CoE, #25): C routing iterations over the same experts inside
one layer.

    x^(0) = x,  x^(t) = sum_i g_{t,i} E_i(x^(t-1)) + x^(t-1)   (t = 1..C, inner residual)

with a dedicated router per iteration choosing K/C experts from x^(t-1), so the layer does the
same expert work as top-K routing. The layer returns x^(C) - x^(0) (the language model adds its own
residual), so C = 1 is exactly a standard MoE layer; without the inner residual
(`inner_residual: false`, the paper's ablation) x^(t) = sum_i g_{t,i} E_i(x^(t-1)) and the layer
returns x^(C). `shared_router: true` is the other ablation, one router for every iteration.

Routing and compute interleave, so the MoE layer calls `route_iteratively(x, mask, previous,
compute)` instead of routing first. The layer's one `Routing` merges the iterations over the real
tokens: kept/dropped hold every iteration's assignments (a token may meet the same expert in two
iterations; `rank` = iteration * K/C + place), `logits`/`scores` are the iterations' means (what the
balancing objectives average), and `extras` holds `iteration_logits` [C, T, E] and `kept_iteration`
[A] (aligned with `kept`). Replaying the merged record in one shot (`MoE.routed`) is not the chain.

Spec axes: as the token-choice router, with `top_k` = K (a multiple of C); no selection bias (its
per-layer update cannot reach C routers) and no jitter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, MoekitError, require_int
from moekit.routing.base import SpecRouter
from moekit.routing.options import ROUTER_OPTIONS, require_bool
from moekit.routing.record import Assignments, Routing
from moekit.routing.spec import RouterSpec
from moekit.routing.token_choice import TokenChoiceRouter


@dataclass(frozen=True)
class ChainOptions:
    """`iterations` C; `inner_residual` and a dedicated router per iteration are the paper's design."""

    iterations: int = 2
    inner_residual: bool = True
    shared_router: bool = False

    def __post_init__(self) -> None:
        require_int(f"{ROUTER_OPTIONS}.iterations", self.iterations, minimum=1)
        require_bool(f"{ROUTER_OPTIONS}.inner_residual", self.inner_residual)
        require_bool(f"{ROUTER_OPTIONS}.shared_router", self.shared_router)


def check_chain_spec(spec: RouterSpec, options: ChainOptions) -> None:
    if spec.top_k % options.iterations:
        raise ConfigError(
            "moe.router.top_k",
            f"got {spec.top_k}, expected a multiple of {ROUTER_OPTIONS}.iterations={options.iterations} "
            "(each iteration chooses top_k / iterations experts)",
        )
    if spec.selection_bias:
        raise ConfigError("moe.router.selection_bias", "the chain router does not support it")
    if spec.jitter_eps:
        raise ConfigError("moe.router.jitter_eps", "the chain router does not support jitter; expected 0")


def merge_iterations(routings: list[Routing], experts_per_iteration: int) -> Routing:
    """One record for C iterations over the same T tokens (see the module docstring)."""
    num_tokens = routings[0].num_tokens

    def merged(parts: list[Assignments]) -> tuple[Assignments, Tensor]:
        iteration = torch.cat([torch.full_like(p.token, i) for i, p in enumerate(parts)])
        token = torch.cat([p.token for p in parts])
        expert = torch.cat([p.expert for p in parts])
        weight = torch.cat([p.weight for p in parts])
        rank = torch.cat([p.rank + i * experts_per_iteration for i, p in enumerate(parts)])
        order = torch.argsort(expert * num_tokens + token, stable=True)
        return Assignments(token[order], expert[order], weight[order], rank[order]), iteration[order]

    kept, kept_iteration = merged([r.kept for r in routings])
    dropped, _ = merged([r.dropped for r in routings])
    logits = torch.stack([r.logits for r in routings])
    scores = torch.stack([r.scores for r in routings])
    return Routing(
        logits=logits.mean(0),
        scores=scores.mean(0),
        kept=kept,
        dropped=dropped,
        token_mask=routings[0].token_mask,
        num_compute_experts=routings[0].num_compute_experts,
        extras={"iteration_logits": logits, "kept_iteration": kept_iteration},
    )


class ChainRouter(SpecRouter):
    @staticmethod
    def check_config(spec: RouterSpec, options: ChainOptions) -> None:
        check_chain_spec(spec, options)

    def __init__(self, hidden_size: int, spec: RouterSpec, options: ChainOptions):
        super().__init__(spec, options)
        self.iteration_spec = spec.with_(top_k=spec.top_k // options.iterations)
        count = 1 if options.shared_router else options.iterations
        self.routers = nn.ModuleList(
            TokenChoiceRouter(hidden_size, self.iteration_spec) for _ in range(count)
        )

    def router_for(self, iteration: int) -> TokenChoiceRouter:
        return self.routers[0 if self.options.shared_router else iteration]

    def forward(self, *args, **kwargs) -> Routing:
        raise MoekitError(
            "the chain router interleaves routing with expert compute; call MoE.forward_with_routing "
            "(or ChainRouter.route_iteratively)"
        )

    def route_iteratively(
        self,
        x: Tensor,
        token_mask: Tensor | None,
        previous: Routing | None,
        compute: Callable[[Tensor, Routing], Tensor],
    ) -> tuple[Tensor, Routing]:
        """(the layer's routed output, the merged routing) for `x` [T, d]; `compute(x, routing)` is
        the experts' weighted sum for one routing (the layer's fast grouped path)."""
        state = x
        routings = []
        for t in range(self.options.iterations):
            routing = self.router_for(t)(state, token_mask)
            update = compute(state, routing)
            state = state + update if self.options.inner_residual else update
            routings.append(routing)
        out = state - x if self.options.inner_residual else state
        return out, merge_iterations(routings, self.iteration_spec.top_k)
