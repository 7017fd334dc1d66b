"""One calibration pass: per MoE layer and expert, the routing and output statistics every
compression method reads, collected by the analysis recorder (`RoutingRecorder`).

The recorder already sees each layer's input and its `Routing`; `CalibrationRecorder` adds, for
every expert, its output on *every* calibration token (so an expert that is never routed still
has a defined similarity, saliency 0 and a Hessian built from the routing probabilities instead
of NaN scales). Costs one extra pass of all experts over the calibration tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.recorder import RoutingRecorder, default_forward, routing_probabilities
from moekit.analysis.trace import routing_slots
from moekit.errors import MoekitError
from moekit.experts.packed import PackedExperts
from moekit.layer import MoE
from moekit.routing.record import Routing


@dataclass
class ExpertStats:
    """Sums over the calibration tokens of one MoE layer (float64, E experts, hidden d, ff I).

    Routed sums run over the tokens routed to the expert (kept assignments, real tokens only);
    `prob_*` and `output_mean` over every real token.
    """

    name: str
    num_experts: int
    tokens: int = 0
    count: Tensor = field(default=None)  # [E] routed tokens
    gate_sum: Tensor = field(default=None)  # [E] sum of the routing weight g
    reap_sum: Tensor = field(default=None)  # [E] sum of g * ||f(x)||
    norm_sum: Tensor = field(default=None)  # [E] sum of ||f(x)|| (EAN)
    prob_sum: Tensor = field(default=None)  # [E] sum of the routing probability, all tokens
    output_sum: Tensor = field(default=None)  # [E, d] sum of f(x) over all tokens
    output_max: Tensor = field(default=None)  # [E] max |f(x)| over routed tokens (super experts)
    hessian_in: Tensor | None = None  # [E, d, d] sum x x^T over routed tokens
    hessian_in_affinity: Tensor | None = None  # [E, d, d] sum p x x^T over all tokens (MoEQuant)
    hessian_mid: Tensor | None = None  # [E, I, I] sum a a^T over routed tokens (a = act(W_in x))
    hessian_mid_affinity: Tensor | None = None  # [E, I, I] sum p a a^T over all tokens

    def __post_init__(self) -> None:
        e = self.num_experts
        for name in ("count", "gate_sum", "reap_sum", "norm_sum", "prob_sum", "output_max"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(e, dtype=torch.float64))

    @property
    def output_mean(self) -> Tensor:
        """[E, d] each expert's mean output over all calibration tokens (HC-SMoE's feature)."""
        return self.output_sum / max(self.tokens, 1)

    @property
    def frequency(self) -> Tensor:
        return self.count / max(self.tokens, 1)


@dataclass
class Calibration:
    layers: list[ExpertStats]
    num_tokens: int
    top_k: int
    meta: dict[str, Any] = field(default_factory=dict)

    def never_routed(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs no calibration token was routed to."""
        return [(i, int(e)) for i, s in enumerate(self.layers) for e in torch.nonzero(s.count == 0).flatten()]

    def coverage(self, min_tokens: int) -> dict[str, Any]:
        below = [
            (i, int(e))
            for i, s in enumerate(self.layers)
            for e in torch.nonzero(s.count < min_tokens).flatten()
        ]
        return {
            "tokens": self.num_tokens,
            "min_tokens_per_expert": min_tokens,
            "fewest_routed": [int(s.count.min()) for s in self.layers],
            "never_routed": [list(p) for p in self.never_routed()],
            "below_min": [list(p) for p in below],
        }


def packed_experts(name: str, moe: MoE) -> PackedExperts:
    """The layer's experts, refused unless they are plain packed SwiGLU/GELU experts routed once."""
    if not isinstance(moe.experts, PackedExperts):
        raise MoekitError(
            f"{name}: compression needs packed experts, got {type(moe.experts).__name__} "
            "(latent/LoRA experts are not supported)"
        )
    if hasattr(moe.router, "route_iteratively"):
        raise MoekitError(f"{name}: chain-of-experts routers cannot be calibrated (they route several times)")
    return moe.experts


def expert_pass(experts: PackedExperts, e: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(a, f): expert `e`'s intermediate activation [n, I] and unweighted output [n, d]."""
    w_in, w_out = experts.w_in[e].to(x.dtype), experts.w_out[e].to(x.dtype)
    h = x @ w_in.T
    if experts.b_in is not None:
        h = h + experts.b_in[e].to(x.dtype)
    a = experts.activation.forward(h)
    f = a @ w_out.T
    if experts.b_out is not None:
        f = f + experts.b_out[e].to(x.dtype)
    return a, f


class CalibrationRecorder(RoutingRecorder):
    """The routing recorder, additionally accumulating `ExpertStats` for every layer."""

    def __init__(self, model: torch.nn.Module, *, hessians: bool = False, **options: Any) -> None:
        super().__init__(model, **options)
        self.hessians = hessians
        self.stats = []
        for name, moe in self.layers:
            experts = packed_experts(name, moe)
            stats = ExpertStats(name, experts.num_experts)
            stats.output_sum = torch.zeros(experts.num_experts, experts.hidden_size, dtype=torch.float64)
            if hessians:
                d, i = experts.hidden_size, experts.ff_size
                for attr, size in (("hessian_in", d), ("hessian_in_affinity", d)):
                    setattr(stats, attr, torch.zeros(experts.num_experts, size, size, dtype=torch.float64))
                for attr in ("hessian_mid", "hessian_mid_affinity"):
                    setattr(stats, attr, torch.zeros(experts.num_experts, i, i, dtype=torch.float64))
            self.stats.append(stats)

    def _capture(self, index: int, x: Tensor, routing: Routing, state: Any) -> None:
        start = state.routed[index]
        super()._capture(index, x, routing, state)
        real = state.mask[start : start + routing.num_tokens].to(x.device)
        _, moe = self.layers[index]
        self._accumulate(self.stats[index], moe.experts, x[real].double(), routing, real)

    def _accumulate(
        self, stats: ExpertStats, experts: PackedExperts, x: Tensor, routing: Routing, real: Tensor
    ) -> None:
        slots, weights, dropped = routing_slots(routing)  # [T, k] expert ids (-1 = none), weights
        slots = slots.masked_fill(dropped, -1)[real.cpu()]
        weights = weights[real.cpu()].double()
        probs = routing_probabilities(routing)[real].double().cpu()
        n = x.shape[0]
        stats.tokens += n
        stats.prob_sum += probs.sum(0)
        for e in range(stats.num_experts):
            a, f = expert_pass(experts, e, x)
            chosen = slots == e
            rows = chosen.any(dim=1)
            g = (weights * chosen).sum(dim=1)[rows]
            norm = f[rows].norm(dim=-1)
            stats.count[e] += int(rows.sum())
            stats.gate_sum[e] += g.sum()
            stats.reap_sum[e] += (g * norm).sum()
            stats.norm_sum[e] += norm.sum()
            stats.output_sum[e] += f.sum(0)
            if rows.any():
                stats.output_max[e] = max(float(stats.output_max[e]), float(f[rows].abs().max()))
            if self.hessians:
                p = probs[:, e]
                stats.hessian_in[e] += x[rows].T @ x[rows]
                stats.hessian_in_affinity[e] += (x * p[:, None]).T @ x
                stats.hessian_mid[e] += a[rows].T @ a[rows]
                stats.hessian_mid_affinity[e] += (a * p[:, None]).T @ a

    def calibration(self) -> Calibration:
        top_k = int(self.layers[0][1].config.router.top_k)
        return Calibration(self.stats, self.stats[0].tokens if self.stats else 0, top_k)


def calibrate(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    hessians: bool = False,
    min_tokens: int = 0,
    forward=default_forward,
) -> Calibration:
    """Run `model` (eval mode, no grad) over `batches` and return the per-expert statistics.

    Balanced calibration: batches are consumed until every expert of every layer has been routed
    at least `min_tokens` tokens (or the batches run out: then the shortfall is an error naming the
    experts, since a method would otherwise judge them on nothing)."""
    was_training = model.training
    model.eval()
    recorder = CalibrationRecorder(model, hessians=hessians)
    try:
        with torch.no_grad(), recorder:
            for batch in batches:
                with recorder.batch(batch):
                    forward(model, batch)
                if min_tokens and all(bool((s.count >= min_tokens).all()) for s in recorder.stats):
                    break
    finally:
        model.train(was_training)
    if recorder.num_batches == 0:
        raise MoekitError("calibration: no batch to calibrate on")
    result = recorder.calibration()
    result.meta["batches"] = recorder.num_batches
    if min_tokens:
        short = result.coverage(min_tokens)["below_min"]
        if short:
            shown = ", ".join(f"layer {i} expert {e}" for i, e in short[:6])
            raise MoekitError(
                f"calibration: {len(short)} experts got fewer than min_tokens={min_tokens} routed tokens "
                f"({shown}{' ...' if len(short) > 6 else ''}); give more calibration data or lower min_tokens"
            )
    return result
