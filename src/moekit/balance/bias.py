"""DeepSeek-V3 auxiliary-loss-free balancing: nudge a per-expert selection bias after every step.

DeepSeek-V3 (2024, §2.1.2) adds a bias b_i to each expert's affinity for top-k *selection* only,
and after each training step moves it by the update speed γ against the expert's load:
b_i ← b_i + γ·sign(mean load − load_i). Getting it right is mostly plumbing (moe-systems.md P5,
P16): the loads are int64 counts of the chosen assignments of real tokens, summed over every
micro-batch of the optimizer step and all-reduced over the data/expert-parallel ranks; the update
runs once per optimizer step; the bias is the router's fp32 `selection_bias` buffer, which is not a
parameter (no optimizer, no weight decay), stays fp32 when the model is cast, and is saved in the
state_dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.errors import MoekitError
from moekit.layer import MoE


def sign_update(counts: Tensor, rate: float) -> Tensor:
    """γ·sign(mean load − load_i) as fp32 [E], from int64 `counts` [E].

    The sign is taken exactly in integers, sign(Σ_j c_j − E·c_i), so no rounding of the mean can flip
    it; an expert exactly at the mean load is left where it is.
    """
    if counts.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise MoekitError(f"bias update: expected integer expert counts, got {counts.dtype}")
    counts = counts.to(torch.int64)
    direction = torch.sign(counts.sum() - counts.shape[-1] * counts)
    return direction.to(torch.float32) * rate


def moe_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The router of every MoE layer of `model`, named, in module order: one per routing record
    the model returns (routers nested inside a layer's router, e.g. chain-of-experts, not counted)."""
    return [
        (f"{name}.router" if name else "router", m.router)
        for name, m in model.named_modules()
        if isinstance(m, MoE)
    ]


def has_selection_bias(model: nn.Module) -> bool:
    return any(getattr(router, "selection_bias", None) is not None for _, router in moe_routers(model))


def apply_bias_updates(model: nn.Module, expert_counts: Sequence[Tensor], rate: float) -> int:
    """Move every router's selection bias by `sign_update(counts, rate)`; returns routers updated.

    `expert_counts` holds one int64 [E] tensor per MoE layer of `model`, in module order
    (`StepReport.expert_counts`: chosen assignments over the whole global batch). Routers without a
    selection bias are skipped. Call it once per optimizer step, after the step's last backward.
    """
    routers = moe_routers(model)
    if len(expert_counts) != len(routers):
        raise MoekitError(
            f"bias update: got expert counts for {len(expert_counts)} layers, "
            f"but the model has {len(routers)} MoE layers"
        )
    updated = 0
    with torch.no_grad():
        for (name, router), counts in zip(routers, expert_counts, strict=True):
            bias = getattr(router, "selection_bias", None)
            if bias is None:
                continue
            if counts.shape != bias.shape:
                raise MoekitError(
                    f"{name}.selection_bias: expected counts of shape {tuple(bias.shape)}, "
                    f"got {tuple(counts.shape)}"
                )
            if torch.finfo(bias.dtype).bits < 32:
                raise MoekitError(f"{name}.selection_bias: is {bias.dtype}; the bias must stay fp32 or wider")
            bias.add_(sign_update(counts.to(bias.device), rate).to(bias.dtype))
            updated += 1
    return updated
