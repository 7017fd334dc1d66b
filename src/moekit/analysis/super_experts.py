"""Super experts (Su et al. 2025, "Unveiling Super Experts in MoE LLMs", #42).

A super expert produces rare, extreme activation outliers at the output of its down projection;
they become the massive activations of the residual stream that make attention sinks, and pruning
a handful of them breaks a model. Profile: output_max = max |expert output| over a calibration set,
per (layer, expert); flag those above both the 99.5th percentile of all output_max values and a
tenth of the largest one.

How magnitudes are captured: the recorder sees each MoE layer's input (the experts' input, except
under training-mode jitter applied to the experts too) and its routing, and re-runs each expert on
the tokens routed to it with the experts module's readable `expert_forward` (the unweighted expert
output, as the paper profiles `down_proj`). This costs one extra expert pass per recorded batch,
leaves the model's outputs untouched, and works for any MoE layer whose experts module has
`expert_forward` and whose router routes the layer input once (not chain-of-experts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.routing.record import Assignments


def expert_output_max(
    experts: nn.Module, num_experts: int, x: Tensor, assignments: Assignments, real: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per expert, the max |output| over the tokens it processed, and the (local) token where it
    occurred: fp32 [E] (0 for an idle expert) and int64 [E] (-1). `experts` needs
    `expert_forward(e, rows)`; `real` [T] bool restricts to real tokens (for models that route
    their padding)."""
    peak = torch.zeros(num_experts)
    where = torch.full((num_experts,), -1, dtype=torch.long)
    token, expert = assignments.token, assignments.expert
    if real is not None:
        keep = real[token]
        token, expert = token[keep], expert[keep]
    with torch.no_grad():
        for e in torch.unique(expert).tolist():
            rows = token[expert == e]
            magnitude = experts.expert_forward(e, x[rows]).abs().amax(dim=-1).float()
            best = int(magnitude.argmax())
            peak[e] = magnitude[best].cpu()
            where[e] = int(rows[best])
    return peak, where


def super_expert_thresholds(
    output_max: Sequence[Tensor], quantile: float = 0.995, fraction_of_max: float = 0.1
) -> tuple[float, float]:
    """(the `quantile` of all finite output_max values, `fraction_of_max` x their maximum)."""
    values = torch.cat([v.flatten().to(torch.float64) for v in output_max]) if output_max else torch.zeros(0)
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return float("nan"), float("nan")
    return float(torch.quantile(values, quantile)), float(values.max()) * fraction_of_max


def find_super_experts(
    output_max: Sequence[Tensor], quantile: float = 0.995, fraction_of_max: float = 0.1
) -> list[tuple[int, int]]:
    """(layer, expert) pairs whose output_max exceeds both thresholds of #42: the 99.5th
    percentile of all (layer, expert) values and a tenth of the largest. `output_max` holds one
    [E] tensor per layer; NaN marks an expert that never ran. Note the largest value always passes
    both tests when it is unique, so judge a lone find by its ratio to the median."""
    above_quantile, above_fraction = super_expert_thresholds(output_max, quantile, fraction_of_max)
    found = []
    for layer, values in enumerate(output_max):
        for expert, value in enumerate(values.tolist()):
            if value == value and value > above_quantile and value > above_fraction:
                found.append((layer, expert))
    return found
