"""A float64 reference MoE, written for reading rather than speed: the fast path is held to it.

Everything is recomputed per token with plain tensor ops in float64 from the layer's own
parameters (copied into float64 leaves, so gradients can be compared): the router's scores,
selection and weights for the spec, capacity dropping as "sort each expert's candidates by
priority and keep the first C", every expert on every kept assignment, and the shared experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.layer import MoE
from moekit.routing.spec import RouterSpec


@dataclass
class ReferenceChoice:
    token: int
    expert: int
    weight: Tensor  # 0-d float64, differentiable
    rank: int


def _score(values: Tensor, score_fn: str) -> Tensor:
    if score_fn == "softmax":
        return torch.exp(values - values.max()) / torch.exp(values - values.max()).sum()
    if score_fn == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-values))
    return values


def reference_token_choices(
    logits_row: Tensor, spec: RouterSpec, selection_bias: Tensor | None
) -> list[tuple[int, Tensor]]:
    """One token's (expert, weight) choices, best first, by the spec read literally."""
    num_experts = spec.num_experts
    if spec.score_timing == "before_topk":
        scores = _score(logits_row, spec.score_fn)
        bias = [0.0] * num_experts if selection_bias is None else selection_bias.tolist()
        selection = [s + b for s, b in zip(scores.detach().tolist(), bias, strict=True)]
        allowed = set(range(num_experts))
        if spec.num_groups > 1:
            size = num_experts // spec.num_groups
            group_scores = []
            for g in range(spec.num_groups):
                members = sorted((selection[e] for e in range(g * size, (g + 1) * size)), reverse=True)
                group_scores.append(members[0] + members[1] if spec.group_score == "top2_sum" else members[0])
            best_groups = sorted(range(spec.num_groups), key=lambda g: -group_scores[g])[: spec.topk_groups]
            allowed = {e for g in best_groups for e in range(g * size, (g + 1) * size)}
        # the kept groups' experts first; if they are fewer than top_k, then the best of the rest
        others = sorted(set(range(num_experts)) - allowed, key=lambda e: -selection[e])
        chosen = (sorted(allowed, key=lambda e: -selection[e]) + others)[: spec.top_k]
        weights = torch.stack([scores[e] for e in chosen])
    else:
        bias = [0.0] * num_experts if selection_bias is None else selection_bias.tolist()
        selection = [s + b for s, b in zip(logits_row.detach().tolist(), bias, strict=True)]
        chosen = sorted(range(num_experts), key=lambda e: -selection[e])[: spec.top_k]
        raw = torch.stack([logits_row[e] for e in chosen])
        weights = (
            _score(raw, spec.score_fn)
            if spec.score_fn == "softmax"
            else torch.stack([_score(v, spec.score_fn) for v in raw])
        )
    if spec.renorm == "sum":
        weights = weights / (weights.sum() + spec.renorm_eps)
    elif spec.renorm == "pnorm":
        weights = weights / (
            weights.abs().pow(spec.renorm_p).sum().pow(1.0 / spec.renorm_p) + spec.renorm_eps
        )
    weights = weights * spec.scaling
    return list(zip(chosen, weights, strict=True))


def reference_capacity(
    choices: list[ReferenceChoice], spec: RouterSpec, num_tokens: int, num_compute_experts: int
) -> tuple[list[ReferenceChoice], list[ReferenceChoice]]:
    """Keep the first C of each expert's candidates by the drop policy ("random" is not modelled)."""
    if spec.capacity_factor is None:
        return choices, []
    capacity = max(1, math.ceil(spec.capacity_factor * len(choices) / spec.num_experts))
    if spec.drop_policy == "position":

        def key(c: ReferenceChoice):
            return (c.rank, c.token)
    elif spec.drop_policy == "score":

        def key(c: ReferenceChoice):
            return (-float(c.weight.detach()), c.token, c.rank)
    else:
        raise ValueError("the reference does not model random dropping")
    kept, dropped = [], []
    for e in range(spec.num_experts):
        mine = sorted((c for c in choices if c.expert == e), key=key)
        if e >= num_compute_experts:
            kept += mine
        else:
            kept += mine[:capacity]
            dropped += mine[capacity:]
    return kept, dropped


@dataclass
class ReferenceResult:
    output: Tensor  # float64, shape of the input
    params: dict[str, Tensor]  # float64 leaves named like the layer's parameters
    kept: list[ReferenceChoice]
    dropped: list[ReferenceChoice]


def reference_moe(layer: MoE, x: Tensor, token_mask: Tensor | None = None) -> ReferenceResult:
    """The layer's output on `x` computed token by token in float64 (eval mode: no jitter).

    Pass a float64 leaf as `x` to compare input gradients.
    """
    params = {name: p.detach().double().clone().requires_grad_(True) for name, p in layer.named_parameters()}
    spec = layer.config.router
    act = layer.experts.activation
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).to(torch.float64)
    mask = (
        torch.ones(flat.shape[0], dtype=torch.bool) if token_mask is None else token_mask.reshape(-1).bool()
    )
    selection_bias = layer.router.selection_bias
    selection_bias = None if selection_bias is None else selection_bias.double()

    router_w = params["router.weight"]
    router_b = params.get("router.bias")
    choices: list[ReferenceChoice] = []
    for t in range(flat.shape[0]):
        if not mask[t]:
            continue
        logits_row = router_w @ flat[t] + (router_b if router_b is not None else 0.0)
        for rank, (e, w) in enumerate(reference_token_choices(logits_row, spec, selection_bias)):
            choices.append(ReferenceChoice(t, e, w, rank))
    kept, dropped = reference_capacity(choices, spec, flat.shape[0], layer.router.num_compute_experts)

    w_in, w_out = params["experts.w_in"], params["experts.w_out"]
    b_in, b_out = params.get("experts.b_in"), params.get("experts.b_out")
    rows = [torch.zeros(shape[-1], dtype=torch.float64) for _ in range(flat.shape[0])]
    for c in kept:
        if c.expert >= layer.router.num_compute_experts:
            continue
        xin = flat[c.token] * c.weight if spec.weight_on == "input" else flat[c.token]
        h = w_in[c.expert] @ xin + (b_in[c.expert] if b_in is not None else 0.0)
        y = w_out[c.expert] @ act.forward(h) + (b_out[c.expert] if b_out is not None else 0.0)
        rows[c.token] = rows[c.token] + (y * c.weight if spec.weight_on == "output" else y)
    out = torch.stack(rows)
    if layer.shared is not None:
        hidden = act.forward(F.linear(flat, params["shared.proj_in.weight"]))
        shared = F.linear(hidden, params["shared.proj_out.weight"])
        if layer.shared.gate is not None:
            shared = torch.sigmoid(F.linear(flat, params["shared.gate.weight"])) * shared
        out = out + shared
    return ReferenceResult(out.reshape(shape), params, kept, dropped)
