"""Stochastic experts (Zuo et al. 2022, THOR, "Taming Sparsely Activated Transformer with Stochastic
Experts", #33): no gating network; each forward pass picks experts at random.

Training (the released `transformer_thor_layer.py`): one expert drawn uniformly per layer and per
forward pass, for the whole batch (`train_sampling: batch`; `token` draws per token). The trainer
runs two forward passes with independent draws and adds the symmetric-KL consistency regulariser
between their output distributions (`moekit.routing.objectives_research.thor_consistency_loss`).
Inference: an independent uniform expert per token (`eval_sampling: token`, the code's
`inference_level=0`) or one for the batch (`batch`).

The weight is 1 (the chosen expert's plain output); logits are zero and the scores uniform, so no
balancing objective has anything to train. Draws use the torch RNG (or the `generator` given to the
router), so `torch.random.fork_rng` reproduces a pass.

Spec axes: `top_k` must be 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.errors import ConfigError, require_choice
from moekit.routing.base import SpecRouter
from moekit.routing.options import ROUTER_OPTIONS, require_spec_defaults
from moekit.routing.record import Assignments, Routing
from moekit.routing.selection import real_tokens
from moekit.routing.spec import RouterSpec
from moekit.routing.token_choice import router_dtype

SAMPLINGS = ("batch", "token")


@dataclass(frozen=True)
class StochasticOptions:
    train_sampling: str = "batch"
    eval_sampling: str = "token"

    def __post_init__(self) -> None:
        require_choice(f"{ROUTER_OPTIONS}.train_sampling", self.train_sampling, SAMPLINGS)
        require_choice(f"{ROUTER_OPTIONS}.eval_sampling", self.eval_sampling, SAMPLINGS)


def uniform_expert_draw(
    num_tokens: int, num_experts: int, per_token: bool, device, generator: torch.Generator | None
) -> Tensor:
    """THOR's random routing: [T] expert ids, one uniform draw per token or one shared by all."""
    if per_token:
        return torch.randint(num_experts, (num_tokens,), generator=generator, device=device)
    return torch.randint(num_experts, (1,), generator=generator, device=device).expand(num_tokens)


class StochasticRouter(SpecRouter):
    @staticmethod
    def check_config(spec: RouterSpec, options: StochasticOptions) -> None:
        require_spec_defaults(spec, "stochastic", set())
        if spec.top_k != 1:
            raise ConfigError("moe.router.top_k", f"got {spec.top_k}; the stochastic (THOR) router takes 1")

    def __init__(self, hidden_size: int, spec: RouterSpec, options: StochasticOptions):
        super().__init__(spec, options)

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        previous: Routing | None = None,
        generator: torch.Generator | None = None,
    ) -> Routing:
        """Draw experts for T tokens of `x` [T, d] (train/eval mode decides how); `previous` unused."""
        num_tokens = x.shape[0]
        mask = real_tokens(token_mask, num_tokens, x.device)
        sampling = self.options.train_sampling if self.training else self.options.eval_sampling
        expert = uniform_expert_draw(num_tokens, self.num_experts, sampling == "token", x.device, generator)
        dtype = router_dtype(x.dtype)
        ones = torch.ones(num_tokens, 1, dtype=dtype, device=x.device)
        kept = Assignments.from_dense(expert.unsqueeze(-1), ones, mask, num_experts=self.num_experts)
        logits = torch.zeros(num_tokens, self.num_experts, dtype=dtype, device=x.device)
        scores = torch.full_like(logits, 1.0 / self.num_experts)
        return Routing(logits, scores, kept, Assignments.empty(x.device), mask, self.num_experts)
