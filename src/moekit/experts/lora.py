"""LoRA experts on a frozen dense FFN (Dou et al. 2023, LoRAMoE, #36).

The layer keeps a dense FFN W0 (frozen: the pre-trained knowledge) and adds E LoRA experts to each
of its two projections; the router mixes them per token:

    h = W0_in x + (alpha / r) sum_i w_i B_in_i A_in_i x
    y = W0_out a + (alpha / r) sum_i w_i B_out_i A_out_i a

with a = act(h). B is zero-initialised, so the layer starts exactly as the dense FFN, and only the
adapters and the router train. LoRAMoE gates densely (w = softmax over all experts): use the
token-choice router with `top_k = num_experts` and no renormalisation; any other router works too.
One router serves both projections here (LoRAMoE's code has one per adapted linear layer).
The balancing constraint is `objectives_research.loramoe_localized_balance_loss`.

Compute: the adapters are low-rank, so the mixture is two thin dense GEMMs with a block-gated
middle (`low_rank_mixture`, SMoRA's B G(x) A x), cheaper than gathering rows per expert whenever
E * r is small against the FFN width. The frozen FFN is loaded with `load_base` (e.g. from a
trained `DenseFFN`); `MoEConfig.ff_size` is its intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.errors import MoekitError, require_int, require_number
from moekit.experts.activations import Activation
from moekit.routing.options import EXPERTS_OPTIONS, require_bool
from moekit.routing.record import Routing
from moekit.routing.selection import dense_weights


@dataclass(frozen=True)
class LoRAOptions:
    """`rank` r per expert, `alpha` (scale alpha / r, as in LoRA), `freeze_base` (the paper: true)."""

    rank: int = 8
    alpha: float = 16.0
    freeze_base: bool = True

    def __post_init__(self) -> None:
        require_int(f"{EXPERTS_OPTIONS}.rank", self.rank, minimum=1)
        require_number(f"{EXPERTS_OPTIONS}.alpha", self.alpha, minimum=0.0, strict=True)
        require_bool(f"{EXPERTS_OPTIONS}.freeze_base", self.freeze_base)


def low_rank_mixture(x: Tensor, a: Tensor, b: Tensor, gates: Tensor, scaling: float) -> Tensor:
    """sum_i gates[:, i] * scaling * B_i A_i x, as one block-gated low-rank map (SMoRA, #47:
    a mixture of E rank-r LoRAs is one rank-E*r LoRA B G(x) A x with G block-diagonal).

    `x` [T, n_in], `a` [E, r, n_in], `b` [E, n_out, r], `gates` [T, E] -> [T, n_out].
    """
    num_experts, rank, n_in = a.shape
    a_all = a.reshape(num_experts * rank, n_in)
    b_all = b.permute(1, 0, 2).reshape(b.shape[1], num_experts * rank)
    middle = F.linear(x, a_all) * gates.repeat_interleave(rank, dim=1).to(x.dtype)
    return F.linear(middle, b_all) * scaling


class LoRAExperts(nn.Module):
    """A frozen dense FFN plus E LoRA experts on each projection (module docstring)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ff_size: int,
        activation: Activation,
        rank: int,
        alpha: float,
        freeze_base: bool = True,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ff_size = ff_size
        self.rank = rank
        self.activation = activation
        self.scaling = alpha / rank
        in_features = activation.in_features(ff_size)
        self.base_in = nn.Parameter(torch.empty(in_features, hidden_size), requires_grad=not freeze_base)
        self.base_out = nn.Parameter(torch.empty(hidden_size, ff_size), requires_grad=not freeze_base)
        self.lora_in_a = nn.Parameter(torch.empty(num_experts, rank, hidden_size))
        self.lora_in_b = nn.Parameter(torch.empty(num_experts, in_features, rank))
        self.lora_out_a = nn.Parameter(torch.empty(num_experts, rank, ff_size))
        self.lora_out_b = nn.Parameter(torch.empty(num_experts, hidden_size, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Base like a dense FFN, then the adapters (`restore_own_init`)."""
        with torch.no_grad():
            nn.init.normal_(self.base_in, std=self.hidden_size**-0.5)
            nn.init.normal_(self.base_out, std=self.ff_size**-0.5)
        self.restore_own_init()

    def restore_own_init(self) -> None:
        """Re-initialise the adapters only: A as in LoRA (uniform, 1/sqrt(fan_in)), B zero so that the
        adapters start silent. A model that re-initialises every matrix calls this afterwards."""
        with torch.no_grad():
            for a in (self.lora_in_a, self.lora_out_a):
                bound = a.shape[-1] ** -0.5
                nn.init.uniform_(a, -bound, bound)
            nn.init.zeros_(self.lora_in_b)
            nn.init.zeros_(self.lora_out_b)

    def load_base(self, proj_in_weight: Tensor, proj_out_weight: Tensor) -> None:
        """Copy a dense FFN into the frozen base: `proj_in_weight` [in, d] ([gate | up] for gated
        activations, as `DenseFFN.proj_in`), `proj_out_weight` [d, ff]."""
        for name, target, source in (
            ("proj_in_weight", self.base_in, proj_in_weight),
            ("proj_out_weight", self.base_out, proj_out_weight),
        ):
            if source.shape != target.shape:
                raise MoekitError(f"{name}: expected shape {tuple(target.shape)}, got {tuple(source.shape)}")
            with torch.no_grad():
                target.copy_(source)

    def gates(self, routing: Routing, num_tokens: int) -> Tensor:
        """Each token's weight on each expert, [T, E] (zero where not routed; null experts dropped)."""
        return dense_weights(routing.compute_assignments, num_tokens, self.num_experts)

    def compute(
        self, x: Tensor, routing: Routing, weight_on: str = "output", backend: str = "auto"
    ) -> Tensor:
        """The frozen FFN plus the routed adapters for every token of `x` [T, d]. The adapters are
        linear, so `weight_on` input or output gives the same result; `backend` does not apply."""
        gates = self.gates(routing, x.shape[0])
        h = F.linear(x, self.base_in)
        h = h + low_rank_mixture(x, self.lora_in_a, self.lora_in_b, gates, self.scaling)
        a = self.activation.forward(h)
        y = F.linear(a, self.base_out)
        return y + low_rank_mixture(a, self.lora_out_a, self.lora_out_b, gates, self.scaling)

    def expert_parameter_count(self) -> int:
        """Parameters of one routed expert (its four adapter matrices)."""
        return sum(p[0].numel() for p in (self.lora_in_a, self.lora_in_b, self.lora_out_a, self.lora_out_b))

    def extra_repr(self) -> str:
        frozen = not self.base_in.requires_grad
        return f"num_experts={self.num_experts}, rank={self.rank}, scaling={self.scaling}, frozen={frozen}"
