"""Routed experts as packed 3-D weights, and always-on shared experts (DeepSeekMoE, #10).

Layout follows HF transformers v5 (nn.Linear style, out x in): `w_in` [E, in, d] where `in` is
2*ff for gated activations ([gate | up], HF's `gate_up_proj`) and ff otherwise; `w_out` [E, d, ff]
(HF's `down_proj`). Optional biases `b_in` [E, in] and `b_out` [E, d] (GPT-OSS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.dispatch.compiled import compiled_experts
from moekit.dispatch.grouped import grouped_experts
from moekit.experts.activations import Activation
from moekit.kernels.linear import Linear
from moekit.routing.record import Routing


class PackedExperts(nn.Module):
    def __init__(
        self, num_experts: int, hidden_size: int, ff_size: int, activation: Activation, bias: bool = False
    ):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ff_size = ff_size
        self.activation = activation
        in_features = activation.in_features(ff_size)
        self.w_in = nn.Parameter(torch.empty(num_experts, in_features, hidden_size))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_size, ff_size))
        self.b_in = nn.Parameter(torch.zeros(num_experts, in_features)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.hidden_size**-0.5)
        nn.init.normal_(self.w_out, std=self.ff_size**-0.5)

    def compute(
        self, x: Tensor, routing: Routing, weight_on: str = "output", backend: str = "auto"
    ) -> Tensor:
        """Sum over the routing's kept compute assignments of weight * expert(x[token])."""
        if torch.compiler.is_compiling():  # static shapes, traceable whole (null experts left out there)
            kept = routing.kept
            return compiled_experts(
                x,
                kept.token,
                kept.expert,
                kept.weight,
                self.w_in,
                self.w_out,
                self.b_in,
                self.b_out,
                self.activation,
                weight_on,
            )
        a = routing.compute_assignments
        return grouped_experts(
            x,
            a.token,
            a.expert,
            a.weight,
            self.w_in,
            self.w_out,
            self.b_in,
            self.b_out,
            self.activation,
            weight_on=weight_on,
            backend=backend,
        )

    def expert_forward(self, expert: int, x: Tensor) -> Tensor:
        """One expert on rows `x` [n, d], unweighted; the readable definition the fast path matches."""
        b_in = None if self.b_in is None else self.b_in[expert]
        b_out = None if self.b_out is None else self.b_out[expert]
        h = F.linear(x, self.w_in[expert], b_in)
        return F.linear(self.activation.forward(h), self.w_out[expert], b_out)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_size}, ff={self.ff_size}, "
            f"activation={self.activation.name}, bias={self.b_in is not None}"
        )


class SharedExperts(nn.Module):
    """K_s always-on experts fused into one FFN of width K_s * ff, with an optional sigmoid gate
    (Qwen2-MoE's `shared_expert_gate`): out = sigmoid(x . g) * FFN(x)."""

    def __init__(self, hidden_size: int, ff_size: int, activation: Activation, gate: bool = False):
        super().__init__()
        self.activation = activation
        self.proj_in = Linear(hidden_size, activation.in_features(ff_size), bias=False)
        self.proj_out = Linear(ff_size, hidden_size, bias=False)
        self.gate = Linear(hidden_size, 1, bias=False) if gate else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.proj_out(self.activation.forward(self.proj_in(x)))
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out
