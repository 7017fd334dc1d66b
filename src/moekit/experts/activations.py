"""Expert activations with hand-written derivatives, for the grouped path's own backward.

Each activation maps the first projection's output h [A, in_features] to a [A, ff] and, given
dL/da, returns dL/dh. Gated activations read h as [gate | up] (gate first, as HF's fused
`gate_up_proj`). The tests hold every derivative to autograd in float64.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.errors import require_choice
from moekit.kernels import torch_swiglu
from moekit.kernels.native import swiglu, swiglu_backward, swiglu_fits


class Activation(ABC):
    name: str = ""
    gated: bool = False

    @abstractmethod
    def forward(self, h: Tensor) -> Tensor:
        """a = act(h)."""

    @abstractmethod
    def backward(self, h: Tensor, grad: Tensor) -> Tensor:
        """dL/dh given h and dL/da."""

    def in_features(self, ff: int) -> int:
        """Width of the first projection for an intermediate size of `ff`."""
        return 2 * ff if self.gated else ff

    def split(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(gate, up): views of h's halves. As `chunk`, not slices: where autograd differentiates
        through them (a shared expert), a slice's backward zero-fills a copy of h per half (in the
        tiny-moe config's training step 12 ms of 316 on one thread), a chunk's joins the halves'
        gradients; the values are the same."""
        gate, up = h.chunk(2, dim=-1)
        return gate, up


class SwiGLU(Activation):
    """silu(gate) * up (Shazeer 2020, "GLU Variants Improve Transformer")."""

    name = "swiglu"
    gated = True

    def forward(self, h: Tensor) -> Tensor:
        if swiglu_fits(h):  # outside autograd
            return swiglu(h)
        if torch_swiglu.fits(h):  # under autograd (shared experts): torch's bits, one pass each way
            return torch_swiglu.swiglu(h)
        gate, up = self.split(h)
        return torch.nn.functional.silu(gate) * up

    def backward(self, h: Tensor, grad: Tensor) -> Tensor:
        if swiglu_fits(h):
            return swiglu_backward(h, grad)
        gate, up = self.split(h)
        ff = gate.shape[-1]
        out = torch.empty_like(h)
        # d/d gate: grad * up * silu'(gate), with torch's fused silu derivative
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=out[..., :ff])
        torch.mul(grad, torch.nn.functional.silu(gate), out=out[..., ff:])
        return out


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return SwiGLU().forward(h)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        return SwiGLU().backward(h, grad)


def swiglu_with_grad(h: Tensor) -> Tensor:
    """SwiGLU of h = [gate | up] for code that differentiates through it with autograd (a dense
    SwiGLU layer), on the same kernels as the experts' activation: one pass each way, where
    torch's silu and mul read h's halves as strided views both ways (a dense FFN's fwd+bwd took
    1.05-1.27x this one's time, BENCHMARKS.md §13)."""
    if torch.compiler.is_compiling() or not (h.requires_grad and torch.is_grad_enabled()):
        # torch's ops under torch.compile, which fuses them (and cannot trace the kernels); no
        # autograd node where nothing differentiates (decode steps)
        return SwiGLU().forward(h)
    return _SwiGLUFunction.apply(h)


@dataclass
class ClampedSwiGLU(Activation):
    """GPT-OSS's SwiGLU: gate clamped above at `limit`, up clamped to [-limit, limit],
    out = (up + 1) * gate * sigmoid(alpha * gate)."""

    alpha: float = 1.702
    limit: float = 7.0
    name = "clamped_swiglu"
    gated = True

    def forward(self, h: Tensor) -> Tensor:
        gate, up = self.split(h)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def backward(self, h: Tensor, grad: Tensor) -> Tensor:
        gate_raw, up_raw = self.split(h)
        ff = gate_raw.shape[-1]
        gate = gate_raw.clamp(max=self.limit)
        up = up_raw.clamp(min=-self.limit, max=self.limit)
        sig = torch.sigmoid(gate * self.alpha)
        glu = gate * sig
        out = torch.empty_like(h)
        # clamp passes the gradient where the input lies inside the bounds (as torch.clamp does)
        up_inside = (up_raw >= -self.limit) & (up_raw <= self.limit)
        torch.mul(grad * glu, up_inside, out=out[..., ff:])
        dglu = sig + self.alpha * glu * (1 - sig)
        torch.mul(grad * (up + 1) * dglu, gate_raw <= self.limit, out=out[..., :ff])
        return out


class GELU(Activation):
    """Exact (erf) GELU, non-gated."""

    name = "gelu"

    def forward(self, h: Tensor) -> Tensor:
        return torch.nn.functional.gelu(h)

    def backward(self, h: Tensor, grad: Tensor) -> Tensor:
        cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
        return grad * (cdf + h * pdf)


class ReLU2(Activation):
    """Squared ReLU (So et al. 2021, "Primer"), non-gated."""

    name = "relu2"

    def forward(self, h: Tensor) -> Tensor:
        return torch.relu(h).square()

    def backward(self, h: Tensor, grad: Tensor) -> Tensor:
        return grad * (2.0 * torch.relu(h))


ACTIVATION_NAMES = ("swiglu", "clamped_swiglu", "gelu", "relu2")


def make_activation(name: str, alpha: float = 1.702, limit: float = 7.0) -> Activation:
    require_choice("experts.activation", name, ACTIVATION_NAMES)
    if name == "swiglu":
        return SwiGLU()
    if name == "clamped_swiglu":
        return ClampedSwiGLU(alpha=alpha, limit=limit)
    if name == "gelu":
        return GELU()
    return ReLU2()
