"""The merging formulas, one small pure function per step, each naming its paper and equation.

Every function works on one *unit*: a stack `deltas` of shape (n, d), one flattened task vector
per fine-tuned model. A unit is a whole tensor, or one expert's slice of a fused expert tensor
(`moekit.merging.api` does the slicing), so every threshold below (TIES density, PCB ratio) is
taken within one expert and never across experts.

Papers:
- Task arithmetic: Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
- TIES: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS 2023).
- DARE: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
  as a Free Lunch" (ICML 2024).
- PCB: Du et al., "Parameter Competition Balancing for Model Merging" (NeurIPS 2024), following
  the authors' `pcb-merging.py`, with one difference of scope: their script flattens the whole
  model into one row per task, so its min-max normalisations and its top-`ratio` are over all
  parameters at once; here they are per unit (tensor or expert), like TIES' density.
"""

from __future__ import annotations

import torch
from torch import Tensor


def task_vector(finetuned: Tensor, base: Tensor) -> Tensor:
    """Task arithmetic, Eq. 1: tau_t = theta_ft - theta_pre."""
    return finetuned - base


def weighted_sum(deltas: Tensor, weights: Tensor) -> Tensor:
    """Task arithmetic, Eq. 2 (without theta_pre): sum_t w_t tau_t over the first axis."""
    return (deltas * weights.view(-1, *([1] * (deltas.dim() - 1)))).sum(dim=0)


def trim_to_density(deltas: Tensor, density: float) -> Tensor:
    """TIES step 1 (Trim, Alg. 1 line 4): keep each row's top-k entries by magnitude,
    k = max(1, int(density * d)) (at least one entry, as mergekit does, so a small unit is never
    emptied by a low density).

    Which of several entries of equal magnitude at the k-th place is kept is unspecified (as in
    mergekit), but exactly k are. A partial selection (topk) rather than a full sort: several
    times faster on large tensors. At density 1 the rows come back unchanged.
    """
    if density >= 1.0:
        return deltas
    d = deltas.shape[-1]
    k = max(1, int(density * d))
    top = torch.topk(deltas.abs(), k, dim=-1, sorted=False).indices
    mask = torch.zeros_like(deltas, dtype=torch.bool).scatter_(-1, top, True)
    return deltas * mask


def elect_sign(weighted_deltas: Tensor) -> Tensor:
    """TIES step 2 (Elect, Alg. 1 line 5): gamma_m = sgn(sum_t tau_t), with 0 counted as +1.

    The sign of the summed (weighted) task vectors is the sign with the larger total mass. A sum of
    exactly 0 elects +1, as mergekit does; it only matters where entries cancel exactly.
    """
    total = weighted_deltas.sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0).to(weighted_deltas.dtype)


def disjoint_mean(weighted_deltas: Tensor, weights: Tensor, sign: Tensor) -> Tensor:
    """TIES step 3 (Disjoint Merge, Alg. 1 lines 6-7): sum_t w_t tau_t / sum_t w_t over the rows
    whose w_t tau_t agrees with the elected sign; a zero entry agrees with nothing. Where no row
    agrees the result is 0. With all w_t = 1 this is the paper's disjoint mean.
    """
    w = weights.view(-1, *([1] * (weighted_deltas.dim() - 1)))
    agree = (torch.sign(weighted_deltas) == sign).to(weighted_deltas.dtype)
    numerator = (weighted_deltas * agree).sum(dim=0)
    denominator = (w * agree).sum(dim=0)
    return numerator / torch.where(denominator == 0, torch.ones_like(denominator), denominator)


def dare_drop(deltas: Tensor, drop_rate: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE, Eq. 2-3: m ~ Bernoulli(p) drops an entry; the kept ones are rescaled by 1/(1-p).

    Drawn row by row as keep ~ Bernoulli(1-p) in float32 (the draw mergekit makes), so a
    generator seeded alike gives the same masks. At p = 0 the rows come back unchanged.
    """
    if drop_rate <= 0.0:
        return deltas
    keep_probability = 1.0 - drop_rate
    rows = []
    for row in deltas:
        keep = torch.bernoulli(
            torch.full(row.shape, keep_probability, dtype=torch.float32), generator=generator
        )
        rows.append(row * keep.to(row.dtype) / keep_probability)
    return torch.stack(rows)


def pcb_minmax(x: Tensor) -> Tensor:
    """PCB's Norm(.): min-max normalisation of each row to [0, 1].

    A row with no spread (max == min) maps to 0, its minimum: the authors' code divides by zero
    there. It happens for a task that left the unit unchanged (its scores are all 0).
    """
    low = x.min(dim=-1, keepdim=True).values
    high = x.max(dim=-1, keepdim=True).values
    spread = high - low
    safe = torch.where(spread == 0, torch.ones_like(spread), spread)
    return torch.where(spread == 0, torch.zeros_like(x), (x - low) / safe)


def pcb_clamp(x: Tensor, low_ratio: float, high_ratio: float) -> Tensor:
    """PCB's clamp: each row clamped to its sorted values at index int(d*low) and int(d*(1-high))-1."""
    d = x.shape[-1]
    low_index = min(int(d * low_ratio), d - 1)
    high_index = max(int(d * (1 - high_ratio) - 1), 0)
    low = torch.kthvalue(x, low_index + 1, dim=-1, keepdim=True).values  # the sorted row's [low_index]
    high = torch.kthvalue(x, high_index + 1, dim=-1, keepdim=True).values
    return torch.minimum(torch.maximum(x, low), high)


PCB_OUTLIER_RATIO = 1e-4  # the authors' NLP code clamps |tau| at the 0.01% / 99.99% quantiles


def pcb_intra_balance(clamped_magnitudes: Tensor) -> Tensor:
    """PCB Eq. 2, intra-balancing: beta_intra = exp(n * Norm(|tau_i|)^2), n = number of tasks."""
    n = clamped_magnitudes.shape[0]
    return torch.exp(n * pcb_minmax(clamped_magnitudes) ** 2)


def pcb_inter_balance(deltas: Tensor) -> Tensor:
    """PCB Eq. 3, inter-balancing: beta_inter = tanh(tau_i * sum_j tau_j), agreement with all tasks."""
    return torch.tanh(deltas * deltas.sum(dim=0, keepdim=True))


def pcb_drop_and_rescale(scores: Tensor, ratio: float) -> Tensor:
    """PCB Eq. 4-5: keep each task's top `ratio` of scores (the rest clamped to the (1-ratio) quantile,
    hence 0 after Norm) and min-max normalise: beta_hat_i = Norm(clamp(beta_i))."""
    return pcb_minmax(pcb_clamp(scores, 1.0 - ratio, 0.0))


def pcb_merge_unit(deltas: Tensor, weights: Tensor, ratio: float) -> Tensor:
    """PCB Eq. 6: tau_m = sum_i w_i tau_i beta_hat_i / sum_i beta_hat_i (denominator >= 1e-12).

    tau_i are the task vectors with outlier magnitudes clamped, as in the authors' code; the
    balancing scores use the unclamped vectors for inter-balancing, as there.
    """
    magnitudes = pcb_clamp(deltas.abs(), PCB_OUTLIER_RATIO, PCB_OUTLIER_RATIO)
    clamped = torch.sign(deltas) * magnitudes
    scores = pcb_intra_balance(magnitudes) * pcb_inter_balance(deltas)
    kept = pcb_drop_and_rescale(scores, ratio)
    w = weights.view(-1, *([1] * (deltas.dim() - 1)))
    return (clamped * kept * w).sum(dim=0) / kept.sum(dim=0).clamp_min(1e-12)
