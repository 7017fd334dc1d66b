"""The dense-to-sparse gate (Nie et al. 2021, EvoMoE, "Evolutional MoE Training via Dense-To-Sparse
Gate", #51): a Gumbel-softmax gate whose temperature anneals, so routing starts (nearly) dense and
ends sparse.

g = softmax((W x + G) / tau) with Gumbel noise G; the token takes every expert with g_i above a
threshold (0.001 in the released `topkgate.py`). At a high temperature g is flat and almost every
expert clears the threshold; as tau falls g sharpens and fewer do. After `hard_after` steps the gate
switches to a hard top-k (`top_k`, 1 in the paper) of the Gumbel sample. Weights are g (`weights:
gumbel`) or softmax(W x) (`weights: softmax`) on the selected experts.

The temperature follows `dts_temperature(step, ...)`. **The trainer calls `router.set_step(step,
total_steps)` before every step**; `set_dts_step(model, step, total_steps)` does it for every gate of
a model. Without a call the gate stays at `temperature_max`. In eval mode the noise is off:
g = softmax(W x / tau) with the same threshold (our choice; the paper does not say).

Spec axes: `top_k` (the hard phase's k), `router_bias`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, require_choice, require_int, require_number
from moekit.routing.base import SpecRouter
from moekit.routing.linear_logits import LinearLogits
from moekit.routing.null_experts import topk_mask
from moekit.routing.options import ROUTER_OPTIONS, require_optional_int, require_spec_defaults
from moekit.routing.record import Assignments, Routing
from moekit.routing.selection import assignments_from_mask, real_tokens
from moekit.routing.spec import RouterSpec

SCHEDULES = ("exponential", "linear")
WEIGHTS = ("gumbel", "softmax")


@dataclass(frozen=True)
class DenseToSparseOptions:
    """Temperatures and threshold default to the released config (tau_max 1.0, tau_min 0.5, 0.001).

    `decay_steps`: T_decay (None: the `total_steps` given to `set_step`); `hard_after`: the step from
    which the gate is a hard top-k of the Gumbel sample (None: never)."""

    temperature_max: float = 1.0
    temperature_min: float = 0.5
    schedule: str = "exponential"
    decay_steps: int | None = None
    threshold: float = 0.001
    hard_after: int | None = None
    weights: str = "gumbel"

    def __post_init__(self) -> None:
        prefix = ROUTER_OPTIONS
        require_number(f"{prefix}.temperature_max", self.temperature_max, minimum=0.0, strict=True)
        require_number(f"{prefix}.temperature_min", self.temperature_min, minimum=0.0, strict=True)
        if self.temperature_min > self.temperature_max:
            raise ConfigError(
                f"{prefix}.temperature_min",
                f"got {self.temperature_min}, expected at most temperature_max={self.temperature_max}",
            )
        require_choice(f"{prefix}.schedule", self.schedule, SCHEDULES)
        require_optional_int(f"{prefix}.decay_steps", self.decay_steps, minimum=1)
        require_number(f"{prefix}.threshold", self.threshold, minimum=0.0, strict=True)
        if self.threshold >= 1:
            raise ConfigError(f"{prefix}.threshold", f"got {self.threshold}, expected a number in (0, 1)")
        require_optional_int(f"{prefix}.hard_after", self.hard_after, minimum=0)
        require_choice(f"{prefix}.weights", self.weights, WEIGHTS)


def dts_temperature(
    step: int, temperature_max: float, temperature_min: float, decay_steps: int, schedule: str
) -> float:
    """EvoMoE (#51) temperature schedule, as in the released `topkgate.py`:

    exponential: tau(t) = max(tau_max * exp(ln(tau_min / tau_max) * t / T_decay), tau_min)
    linear:      tau(t) = max(tau_max - t * (tau_max - tau_min) / T_decay, tau_min)
    """
    fraction = step / decay_steps
    if schedule == "exponential":
        tau = temperature_max * math.exp(math.log(temperature_min / temperature_max) * fraction)
    else:
        tau = temperature_max - fraction * (temperature_max - temperature_min)
    return max(tau, temperature_min)


def gumbel_noise(shape: torch.Size, dtype: torch.dtype, device, generator: torch.Generator | None) -> Tensor:
    """G = -log(-log U), U ~ U(0, 1) (kept away from 0 and 1)."""
    tiny = torch.finfo(dtype).tiny
    u = torch.rand(shape, dtype=dtype, device=device, generator=generator).clamp(tiny, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def gumbel_softmax(logits: Tensor, temperature: float, noise: Tensor | None) -> Tensor:
    """The Gumbel-softmax sample softmax((z + G) / tau) (Jang et al. 2017), noise-free if G is None."""
    perturbed = logits if noise is None else logits + noise
    return torch.softmax(perturbed / temperature, dim=-1)


class DenseToSparseRouter(SpecRouter):
    @staticmethod
    def check_config(spec: RouterSpec, options: DenseToSparseOptions) -> None:
        require_spec_defaults(spec, "dense_to_sparse", {"router_bias"})

    def __init__(self, hidden_size: int, spec: RouterSpec, options: DenseToSparseOptions):
        super().__init__(spec, options)
        self.linear = LinearLogits(hidden_size, spec.num_experts, bias=spec.router_bias)
        self.step = 0
        self.total_steps: int | None = None

    def set_step(self, step: int, total_steps: int | None = None) -> None:
        """Tell the gate which optimizer step comes next (and the run's length, T_decay by default)."""
        require_int("step", step, minimum=0)
        if total_steps is not None:
            require_int("total_steps", total_steps, minimum=1)
        self.step = step
        self.total_steps = total_steps

    @property
    def temperature(self) -> float:
        o = self.options
        decay = o.decay_steps if o.decay_steps is not None else self.total_steps
        if decay is None:
            return o.temperature_max
        return dts_temperature(self.step, o.temperature_max, o.temperature_min, decay, o.schedule)

    @property
    def hard(self) -> bool:
        return self.options.hard_after is not None and self.step >= self.options.hard_after

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        previous: Routing | None = None,
        generator: torch.Generator | None = None,
    ) -> Routing:
        """Route T tokens of `x` [T, d] at the current temperature; `previous` is not used."""
        mask = real_tokens(token_mask, x.shape[0], x.device)
        logits = self.linear(x)
        probs = torch.softmax(logits, dim=-1)
        noise = gumbel_noise(logits.shape, logits.dtype, x.device, generator) if self.training else None
        tau = self.temperature
        gate = gumbel_softmax(logits, tau, noise)
        selected = topk_mask(gate, self.spec.top_k) if self.hard else gate > self.options.threshold
        weights = gate if self.options.weights == "gumbel" else probs
        chosen = assignments_from_mask(selected, weights, gate, mask)
        extras = {"temperature": torch.tensor(tau, dtype=logits.dtype)}
        return Routing(logits, probs, chosen, Assignments.empty(x.device), mask, self.num_experts, extras)


def set_dts_step(model: nn.Module, step: int, total_steps: int | None = None) -> int:
    """`set_step` on every dense-to-sparse gate of `model`; returns how many there are."""
    gates = [m for m in model.modules() if isinstance(m, DenseToSparseRouter)]
    for gate in gates:
        gate.set_step(step, total_steps)
    return len(gates)
