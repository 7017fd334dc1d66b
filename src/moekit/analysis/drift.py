"""Routing drift: how differently two models (two checkpoints of one run) route the same tokens.

OpenMoE (Xue et al. 2024, §5 "Early Routing Learning") found token -> expert assignments fixed
early in pre-training; comparing a checkpoint's trace with a later one's on identical data measures
that directly. Expert ids are compared as they are, which is meaningful between checkpoints of one
run (for independently trained models, experts would first need matching).
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.analysis import metrics as m
from moekit.analysis.health import domain_nmi
from moekit.analysis.trace import RoutingTrace
from moekit.errors import MoekitError


def check_same_tokens(a: RoutingTrace, b: RoutingTrace) -> None:
    """Both traces must hold the same tokens in the same order and comparable layers."""
    if a.num_tokens != b.num_tokens or not torch.equal(a.token_ids, b.token_ids):
        raise MoekitError(
            f"routing drift: the traces hold different tokens ({a.num_tokens} vs {b.num_tokens}); "
            "record both models on the same batches"
        )
    if not torch.equal(a.positions, b.positions) or not torch.equal(a.sequences, b.sequences):
        raise MoekitError("routing drift: the traces lay the same tokens out differently (positions, rows)")
    if a.num_layers != b.num_layers:
        raise MoekitError(f"routing drift: {a.num_layers} MoE layers vs {b.num_layers}")
    for la, lb in zip(a.layers, b.layers, strict=True):
        if la.num_experts != lb.num_experts:
            raise MoekitError(
                f"routing drift: layer {la.name!r} has {la.num_experts} experts, "
                f"{lb.name!r} has {lb.num_experts}"
            )


def routing_drift(a: RoutingTrace, b: RoutingTrace, min_count: int = 2) -> dict[str, Any]:
    """Per MoE layer: top-1 agreement, mean top-k Jaccard, token-id -> majority-expert map agreement
    and Jaccard (ids seen >= min_count times), Jensen-Shannon divergence of the loads, and each
    trace's domain NMI. NaN where undefined."""
    check_same_tokens(a, b)
    layers = []
    for index, (la, lb) in enumerate(zip(a.layers, b.layers, strict=True)):
        agreement, jaccard = m.token_map_agreement(la.top1, lb.top1, a.token_ids, min_count)
        layers.append(
            {
                "name": la.name,
                "top1_agreement": m.top1_agreement(la.top1, lb.top1),
                "topk_jaccard": m.topk_jaccard(la.experts, lb.experts, la.num_experts),
                "token_map_agreement": agreement,
                "token_map_jaccard": jaccard,
                "load_js_divergence": m.js_divergence(
                    la.load(compute_only=False), lb.load(compute_only=False)
                ),
                "domain_nmi_a": domain_nmi(a, index),
                "domain_nmi_b": domain_nmi(b, index),
            }
        )
    return {
        "tokens": a.num_tokens,
        "a": a.meta.get("source"),
        "b": b.meta.get("source"),
        "layers": layers,
    }
