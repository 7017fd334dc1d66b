"""Latent experts ("Beyond Standard MoE: Mixture of Latent Experts", MoLE/MoLAE, #14).

Every expert's linear maps are factorised through a latent space of width r shared by all experts:
the first projection W_in_i = B_in_i A_in (A_in [r, d] shared, B_in_i [in, r] per expert) and the
second W_out_i = A_out B_out_i (B_out_i [r, ff] per expert, A_out [d, r] shared). An expert then
costs in*r + r*ff parameters instead of in*d + d*ff, which pays when d is large against ff.

Because A_in and A_out are shared and linear, the routed sum is
y = A_out * sum_i w_i * expert_i^latent(A_in x): the shared projections run once per token and the
per-expert work is an ordinary packed FFN over the latent width, on the fast grouped path
(`PackedExperts.compute`).

`LatentExperts.from_packed(experts, r)` converts standard experts by the SVD factorisation of
papers.md's [recon] (the paper's two-phase algorithm is not published): A_in = V_r^T from the top-r
right singular vectors of the stacked [W_in_1; ...; W_in_E], A_out = U_r from the top-r left
singular vectors of [W_out_1 | ... | W_out_E], and B by projection. Experts whose maps share an
r-dimensional row (column) space are reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, require_int
from moekit.experts.activations import Activation
from moekit.experts.packed import PackedExperts
from moekit.routing.options import EXPERTS_OPTIONS
from moekit.routing.record import Routing


@dataclass(frozen=True)
class LatentOptions:
    """`latent_size` r, the width of the shared latent space (at most the hidden size)."""

    latent_size: int

    def __post_init__(self) -> None:
        require_int(f"{EXPERTS_OPTIONS}.latent_size", self.latent_size, minimum=1)


class LatentExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ff_size: int,
        activation: Activation,
        latent_size: int,
        bias: bool = False,
    ):
        super().__init__()
        if latent_size > hidden_size:
            raise ConfigError(
                f"{EXPERTS_OPTIONS}.latent_size",
                f"got {latent_size}, expected at most the hidden size {hidden_size}",
            )
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.latent_size = latent_size
        self.activation = activation
        self.proj_in = nn.Linear(hidden_size, latent_size, bias=False)  # A_in, shared
        self.proj_out = nn.Linear(latent_size, hidden_size, bias=False)  # A_out, shared
        self.latent_experts = PackedExperts(num_experts, latent_size, ff_size, activation, bias=bias)

    def compute(
        self, x: Tensor, routing: Routing, weight_on: str = "output", backend: str = "auto"
    ) -> Tensor:
        """A_out * (sum over kept compute assignments of weight * latent expert(A_in x[token]))."""
        latent = self.latent_experts.compute(self.proj_in(x), routing, weight_on, backend)
        return self.proj_out(latent)

    def expert_parameter_count(self) -> int:
        """Parameters of one routed expert (the shared projections excluded: every token uses them)."""
        return sum(p[0].numel() for p in self.latent_experts.parameters())

    @classmethod
    def from_packed(cls, experts: PackedExperts, latent_size: int) -> LatentExperts:
        """Latent experts approximating `experts` by the SVD factorisation (module docstring)."""
        num_experts, in_features, hidden = experts.w_in.shape
        bias = experts.b_in is not None
        out = cls(num_experts, hidden, experts.ff_size, experts.activation, latent_size, bias=bias)
        out = out.to(device=experts.w_in.device, dtype=experts.w_in.dtype)
        with torch.no_grad():
            w_in = experts.w_in.detach().double()  # [E, in, d]
            w_out = experts.w_out.detach().double()  # [E, d, ff]
            v = torch.linalg.svd(w_in.reshape(-1, hidden), full_matrices=False).Vh[:latent_size]  # [r, d]
            u = torch.linalg.svd(w_out.permute(1, 0, 2).reshape(hidden, -1), full_matrices=False).U
            u = u[:, :latent_size]  # [d, r]
            dtype = experts.w_in.dtype
            out.proj_in.weight.copy_(v.to(dtype))
            out.proj_out.weight.copy_(u.to(dtype))
            out.latent_experts.w_in.copy_((w_in @ v.t()).to(dtype))
            out.latent_experts.w_out.copy_((u.t() @ w_out).to(dtype))
            if experts.b_in is not None:
                out.latent_experts.b_in.copy_(experts.b_in)
                out.latent_experts.b_out.copy_((experts.b_out.double() @ u).to(dtype))
        return out
