"""Cosine / prototype routing (ProMoE's prototypical routing, #18; RouterRetriever's pilot
embeddings, #23; the cosine router of X-MoE, Chi et al. 2022).

Each expert owns a learnable prototype c_i; a token's logit is the cosine between its (optionally
projected) hidden state and the prototype, divided by a temperature: z_i = cos(phi(x), c_i) / tau,
with phi(x) = P x (no bias) or phi(x) = x. The logits then go through the ordinary spec-driven
top-k. Because cosine ignores length, routing depends only on the direction of x: scaling a hidden
state never changes its experts or weights.

`set_prototypes(centroids)` initialises the prototypes from data, e.g. per-expert k-means centroids
of base-encoder embeddings as RouterRetriever's pilot embeddings. ProMoE's routing contrastive loss
is `moekit.routing.objectives_research.routing_contrastive_loss`. ProMoE's conditional step (hard
routing of classifier-free-guidance tokens) has no counterpart in a language model and is left out.

Spec axes: every top-k axis (`score_fn`, `renorm`, `top_k`, capacity, ...) but `router_bias` and the
selection bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import ConfigError, MoekitError, require_number
from moekit.routing.base import SpecRouter
from moekit.routing.options import ROUTER_OPTIONS, require_optional_int
from moekit.routing.record import Assignments, Routing
from moekit.routing.selection import real_tokens, split_by_capacity
from moekit.routing.spec import RouterSpec
from moekit.routing.token_choice import choose_topk, router_dtype


@dataclass(frozen=True)
class CosineOptions:
    """`dim`: width of the projection phi (None: no projection, prototypes live in the hidden
    space); `temperature` tau (0.07, X-MoE's initial value; ProMoE's is not published)."""

    dim: int | None = None
    temperature: float = 0.07

    def __post_init__(self) -> None:
        require_optional_int(f"{ROUTER_OPTIONS}.dim", self.dim, minimum=1)
        require_number(f"{ROUTER_OPTIONS}.temperature", self.temperature, minimum=0.0, strict=True)


def cosine_logits(features: Tensor, prototypes: Tensor, temperature: float, eps: float = 1e-12) -> Tensor:
    """ProMoE (#18) prototypical routing score: z_{t,i} = cos(phi(x_t), c_i) / tau, [T, E]."""
    return F.normalize(features, dim=-1, eps=eps) @ F.normalize(prototypes, dim=-1, eps=eps).t() / temperature


class CosineRouter(SpecRouter):
    @staticmethod
    def check_config(spec: RouterSpec, options: CosineOptions) -> None:
        for name in ("router_bias", "selection_bias"):
            if getattr(spec, name):
                raise ConfigError(f"moe.router.{name}", "the cosine router does not support it")

    def __init__(self, hidden_size: int, spec: RouterSpec, options: CosineOptions):
        super().__init__(spec, options)
        width = options.dim if options.dim is not None else hidden_size
        self.proj = None
        if options.dim is not None:
            self.proj = nn.Parameter(torch.empty(options.dim, hidden_size))
            nn.init.normal_(self.proj, std=hidden_size**-0.5)
        self.prototypes = nn.Parameter(torch.empty(spec.num_experts, width))
        nn.init.normal_(self.prototypes, std=width**-0.5)

    def features(self, x: Tensor) -> Tensor:
        """phi(x) in the router dtype."""
        x = x.to(router_dtype(x.dtype))
        return x if self.proj is None else F.linear(x, self.proj.to(x.dtype))

    def set_prototypes(self, centroids: Tensor) -> None:
        """Set the prototypes to `centroids` [E, width] (phi-space vectors, e.g. k-means centroids)."""
        if centroids.shape != self.prototypes.shape:
            raise MoekitError(
                f"prototypes: expected shape {tuple(self.prototypes.shape)}, got {tuple(centroids.shape)}"
            )
        with torch.no_grad():
            self.prototypes.copy_(centroids)

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        previous: Routing | None = None,
        generator: torch.Generator | None = None,
    ) -> Routing:
        """Route T tokens of `x` [T, d]; `previous` is not used by this router."""
        mask = real_tokens(token_mask, x.shape[0], x.device)
        features = self.features(x)
        logits = cosine_logits(features, self.prototypes.to(features.dtype), self.options.temperature)
        scores, index, weights = choose_topk(logits, self.spec, None)
        chosen = Assignments.from_dense(index, weights, mask, num_experts=logits.shape[1])
        kept, dropped = split_by_capacity(chosen, self.spec, x.shape[0], self.num_experts, generator)
        return Routing(logits, scores, kept, dropped, mask, self.num_experts)
