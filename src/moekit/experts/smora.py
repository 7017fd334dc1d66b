"""Rank-wise LoRA experts (SMoRA, "Each Rank Could be an Expert: Single-Ranked MoE LoRA", #47).

A mixture of E rank-r LoRAs is one rank-E*r LoRA with a block-diagonal gate, dW x = B G(x) A x;
SMoRA takes the finest blocks, one rank per expert: G(x) = diag(TopK_k(s(x))) over the R ranks of a
single LoRA on the frozen FFN. Here the R = `router.num_experts` ranks are the experts, each a rank-1
`LoRAExperts` adapter, scaled as one rank-R LoRA (alpha / R).

SMoRA balances rank load with a non-gradient bias b in s(x) = W_g x + b, moved against each rank's
load (the exact rule is not published; papers.md #47). Use the token-choice router with
`router.selection_bias: true` and `balance.bias_update_rate` > 0: DeepSeek-V3's sign update
b_i <- b_i + u * sign(mean load - load_i) is that rule (`moekit.balance.apply_bias_updates`).
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.errors import require_number
from moekit.experts.activations import Activation
from moekit.experts.lora import LoRAExperts
from moekit.routing.options import EXPERTS_OPTIONS, require_bool


@dataclass(frozen=True)
class SMoRAOptions:
    """`alpha` (scale alpha / R for R ranks), `freeze_base` (true in the paper)."""

    alpha: float = 16.0
    freeze_base: bool = True

    def __post_init__(self) -> None:
        require_number(f"{EXPERTS_OPTIONS}.alpha", self.alpha, minimum=0.0, strict=True)
        require_bool(f"{EXPERTS_OPTIONS}.freeze_base", self.freeze_base)


class SMoRAExperts(LoRAExperts):
    """One rank-R LoRA on each FFN projection whose R ranks are routed as R experts."""

    def __init__(
        self,
        num_ranks: int,
        hidden_size: int,
        ff_size: int,
        activation: Activation,
        alpha: float,
        freeze_base: bool,
    ):
        super().__init__(
            num_ranks, hidden_size, ff_size, activation, rank=1, alpha=alpha, freeze_base=freeze_base
        )
        self.scaling = alpha / num_ranks
