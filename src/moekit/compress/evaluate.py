"""What a compression lost: per-domain validation loss and top-k router agreement with the
original model on held-out batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.analysis.recorder import default_forward
from moekit.analysis.trace import routing_slots
from moekit.data.batch import IGNORE_INDEX


def _forward(model: nn.Module, batch: Any) -> tuple[Tensor, list[Tensor]]:
    """(logits [B, S, V], per MoE layer the chosen experts [B*S, k] (-1 = none))."""
    out = default_forward(model, batch)
    return out.logits, [routing_slots(r)[0] for r in out.routings]


def domain_losses(logits: Tensor, batch: Any, num_domains: int) -> tuple[Tensor, Tensor]:
    """Summed next-token loss and target count per domain, float64 [D] each."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none").double()
    valid = batch.targets.flatten() != IGNORE_INDEX
    domains = batch.domains.flatten().clamp_min(0)
    sums = torch.zeros(num_domains, dtype=torch.float64).index_add_(0, domains[valid], loss[valid])
    counts = torch.zeros(num_domains, dtype=torch.float64).index_add_(
        0, domains[valid], torch.ones_like(loss[valid])
    )
    return sums, counts


def topk_overlap(original: Tensor, compressed: Tensor, expert_map: Tensor, real: Tensor) -> tuple[float, int]:
    """Summed per-token share of the original top-k (mapped to the compressed experts by
    `expert_map`, -1 for removed ones) that the compressed router also chose, and the token count."""
    width = int(max(int(expert_map.max()), int(compressed.max()))) + 2
    mapped = torch.where(original >= 0, expert_map[original.clamp_min(0)], torch.full_like(original, -1))
    a = torch.zeros(original.shape[0], width, dtype=torch.bool).scatter_(1, mapped + 1, True)[:, 1:]
    b = torch.zeros(original.shape[0], width, dtype=torch.bool).scatter_(1, compressed + 1, True)[:, 1:]
    k = (original >= 0).sum(1).clamp_min(1)
    share = (a & b).sum(1).double() / k
    return float(share[real].sum()), int(real.sum())


@dataclass
class Reference:
    """The original model's per-batch loss sums and chosen experts, computed once and compared
    with any number of compressed models."""

    sums: list[Tensor]
    counts: list[Tensor]
    slots: list[list[Tensor]]
    domain_names: tuple[str, ...]


@torch.no_grad()
def reference(original: nn.Module, batches: Sequence[Any], domain_names: Sequence[str]) -> Reference:
    d = max(len(domain_names), 1)
    original.eval()
    sums, counts, slots = [], [], []
    for batch in batches:
        logits, chosen = _forward(original, batch)
        s, c = domain_losses(logits, batch, d)
        sums.append(s)
        counts.append(c)
        slots.append(chosen)
    return Reference(sums, counts, slots, tuple(domain_names))


@torch.no_grad()
def compare(
    original: nn.Module | Reference,
    compressed: nn.Module,
    batches: Sequence[Any],
    domain_names: Sequence[str],
    expert_maps: list[Tensor],
) -> dict[str, Any]:
    """Losses of both models per domain and the router agreement per layer on `batches`
    (`original` may be a precomputed `Reference` on the same batches)."""
    ref = original if isinstance(original, Reference) else reference(original, batches, domain_names)
    d = max(len(domain_names), 1)
    after = torch.zeros(d, dtype=torch.float64)
    agree = [0.0] * len(expert_maps)
    tokens = 0
    compressed.eval()
    for index, batch in enumerate(batches):
        logits_b, slots_b = _forward(compressed, batch)
        after += domain_losses(logits_b, batch, d)[0]
        real = batch.token_mask.flatten()
        for i, (a, b) in enumerate(zip(ref.slots[index], slots_b, strict=True)):
            agree[i] += topk_overlap(a, b, expert_maps[i], real)[0]
        tokens += int(real.sum())
    before, counts = sum(ref.sums), sum(ref.counts)
    names = list(domain_names) or ["all"]

    def losses(sums: Tensor) -> dict[str, float]:
        per = (sums / counts.clamp_min(1)).tolist()
        out = {name: per[i] for i, name in enumerate(names) if counts[i] > 0}
        out["all"] = float(sums.sum() / counts.sum().clamp_min(1))
        return out

    return {
        "loss_before": losses(before),
        "loss_after": losses(after),
        "router_topk_agreement": [a / max(tokens, 1) for a in agree],
        "eval_tokens": tokens,
    }
