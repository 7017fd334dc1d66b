"""Non-uniform expert counts per layer, and the padding that stores them in one-count configs.

Pruning may keep a different number of experts in each MoE layer (an explicit list, or a global
budget shared out by saliency). No family moekit writes can say so: every HF family's config has
one scalar expert count (`num_local_experts`, `num_experts`, `n_routed_experts`,
`ffn_config.moe_num_experts`), and moekit's `LMConfig` has one `MoEConfig` for all its MoE
layers. So every layer is padded to the largest count, in one of two ways chosen per model:

- `mask`: the padding experts are zero tensors whose router logit (router bias, GPT-OSS and
  moekit's LM, to which the bias is added) or selection score (the selection bias, DeepSeek-V3)
  is `PAD_LOGIT`. They are never chosen and get weight exactly 0 (exp and sigmoid of -1e4
  underflow to 0 in float32 and float64), so the padded model computes what the non-uniform one
  computes; the padding costs only bytes. Transformers loads the folder as it is.
- `restore`: families whose router has neither bias (Mixtral, Qwen2/3-MoE, OLMoE, Granite, DBRX,
  Llama 4: a bias-free linear router, whose logit for any row is an odd function of the normalised
  hidden state, so no row can be kept out of the top-k) keep, in the short layers, the next-best
  experts by the same saliency instead: the model is the uniform prune at the largest count, and
  the report says which experts were restored and what they cost.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.analysis.recorder import find_moe_layers
from moekit.compress.surgery import EXPERT_TENSORS, build_like, layer_tensors, select_rows
from moekit.errors import ConfigError, MoekitError
from moekit.layer import MoE

PAD_LOGIT = -1.0e4
PADDING_MODES = ("mask", "restore")


def padding_mode(model: nn.Module) -> tuple[str, str | None]:
    """(mode, the tensor that masks padding experts) for `model`: see the module docstring."""
    from moekit.interop.model import FamilyModel

    spec = find_moe_layers(model)[0][1].config.router
    if spec.capacity_factor is not None:
        return "restore", None  # capacities depend on the expert count: padding would move them
    if spec.router_bias or not isinstance(model, FamilyModel):
        return "mask", "router.bias"
    exact_on_selection = (
        spec.score_fn == "sigmoid"
        or spec.score_timing == "after_topk"
        or (spec.renorm != "none" and spec.renorm_eps == 0)
    )
    if spec.selection_bias and exact_on_selection:
        return "mask", "router.selection_bias"
    return "restore", None


def minimum_count(spec: Any) -> int:
    """The fewest experts a layer may keep: top-k, and under group-limited routing enough per
    group that the kept groups still hold top-k experts (and two each for a top-2 group score)."""
    groups = spec.num_groups
    if groups == 1:
        return spec.top_k
    per_group = max(-(-spec.top_k // spec.topk_groups), 2 if spec.group_score == "top2_sum" else 1)
    return groups * per_group


def allocate_counts(scores: list[Tensor], keep_total: int, minimum: int, step: int) -> list[int]:
    """Per-layer counts sharing a global budget of `keep_total` experts by saliency: each layer's
    scores are made shares of that layer's total (saliencies are not comparable across layers,
    their within-layer shares are), every layer keeps its experts among the `keep_total` largest
    shares of the model, rounded to a multiple of `step` (the router's groups) and at least
    `minimum`. The total can differ from `keep_total` by that rounding."""
    shares = []
    for i, score in enumerate(scores):
        score = score.double().clamp_min(0)
        total = float(score.sum())
        share = score / total if total > 0 else torch.full_like(score, 1.0 / score.numel())
        shares += [(-float(s), i, e) for e, s in enumerate(share.tolist())]
    chosen = sorted(shares)[:keep_total]
    counts = []
    for i, score in enumerate(scores):
        count = sum(1 for _, layer, _ in chosen if layer == i)
        count = int(round(count / step)) * step
        counts.append(min(max(count, minimum), score.numel()))
    return counts


def _layout(index: Tensor, num_experts: int, width: int, groups: int) -> list[int]:
    """Positions of the padded layer: per router group, its kept experts (original ids, sorted)
    then its padding slots (-1), so that group g still spans positions [g*width/G, (g+1)*width/G)."""
    group_size, per_group = num_experts // groups, width // groups
    out = []
    for g in range(groups):
        members = [int(e) for e in index.tolist() if g * group_size <= e < (g + 1) * group_size]
        out += members + [-1] * (per_group - len(members))
    return out


def expert_bytes(moe: MoE, dtype_bytes: float) -> int:
    """Bytes of one expert's tensors and router row (in a dtype of `dtype_bytes` per element)."""
    per = sum(v[0].numel() for k, v in moe.state_dict().items() if k in EXPERT_TENSORS)
    per += moe.config.hidden_size + (1 if moe.config.router.router_bias else 0)
    return int(per * dtype_bytes)


@dataclass
class Padded:
    model: nn.Module
    mode: str
    positions: list[list[int]]  # per layer, the original expert at each position (-1 padding)
    layers: list[dict[str, Any]]  # per layer: kept, removed, padded, padding_bytes


def _mask_padded(model: nn.Module, keep: list[Tensor], width: int, tensor: str) -> tuple[nn.Module, list]:
    """The model whose layer i holds its `keep[i]` experts and `width - len(keep[i])` masked ones."""
    moe_layers = find_moe_layers(model)
    spec = moe_layers[0][1].config.router
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    positions = []
    add_bias = tensor == "router.bias" and not spec.router_bias
    for (name, moe), index in zip(moe_layers, keep, strict=True):
        tensors = layer_tensors(name, moe)
        if add_bias:
            tensors["router.bias"] = torch.zeros(spec.num_experts, dtype=tensors["router.weight"].dtype)
        layout = _layout(index, spec.num_experts, width, spec.num_groups)
        real = torch.tensor([p for p, e in enumerate(layout) if e >= 0], dtype=torch.long)
        source = torch.tensor([e for e in layout if e >= 0], dtype=torch.long)
        for key, value in tensors.items():
            out = torch.zeros((width, *value.shape[1:]), dtype=value.dtype)
            if key == tensor:
                out.fill_(PAD_LOGIT)
            out[real] = value.index_select(0, source.to(value.device)).cpu()
            state[f"{name}.{key}"] = out.contiguous()
        positions.append(layout)
    from moekit.compress.surgery import with_num_experts

    config = with_num_experts(model.config, width)
    if add_bias:
        moe_config = config.moe
        router = dataclasses.replace(moe_config.router, router_bias=True)
        config = dataclasses.replace(config, moe=dataclasses.replace(moe_config, router=router))
    new = build_like(model, config, state)
    new.train(model.training)
    return new, positions


def _restored(keep: Tensor, score: Tensor, width: int, groups: int) -> Tensor:
    """`keep` grown to `width` experts with the next-best by `score`, the same number per group."""
    from moekit.compress.prune import top_experts

    ranked = score.double().clone()
    ranked[keep] = float("inf")
    return top_experts(ranked, width, groups)


def pad(model: nn.Module, keep: list[Tensor], scores: list[Tensor], mode: str | None = None) -> Padded:
    """`model` pruned to `keep[i]` experts in MoE layer i (counts may differ), stored with every
    layer at the largest count: padding experts masked, or the next-best experts restored."""
    moe_layers = find_moe_layers(model)
    spec = moe_layers[0][1].config.router
    width = max(int(k.numel()) for k in keep)
    chosen, tensor = padding_mode(model)
    mode = mode or chosen
    if mode not in PADDING_MODES:
        raise ConfigError("prune.padding", f"got {mode!r}, expected one of {', '.join(PADDING_MODES)}")
    if mode == "mask" and tensor is None:
        raise MoekitError(
            "prune.padding: this model's router has no bias that can mask padding experts; use restore"
        )
    dtype_bytes = next(model.parameters()).element_size()
    if mode == "mask":
        padded, positions = _mask_padded(model, keep, width, tensor)
        restored = [[] for _ in keep]
    else:
        grown = [_restored(k, s, width, spec.num_groups) for k, s in zip(keep, scores, strict=True)]
        padded = select_rows(model, grown)
        positions = [g.tolist() for g in grown]
        restored = [sorted(set(g.tolist()) - set(k.tolist())) for g, k in zip(grown, keep, strict=True)]
    layers = []
    for (name, _), moe, index, extra in zip(moe_layers, padded.moe_layers, keep, restored, strict=True):
        count = width - int(index.numel())
        layers.append(
            {
                "layer": name,
                "kept": index.tolist(),
                "removed": sorted(set(range(spec.num_experts)) - set(index.tolist()) - set(extra)),
                "padded": count,
                "restored": extra,
                "padding_bytes": count * expert_bytes(moe, dtype_bytes),
            }
        )
    return Padded(padded, mode, positions, layers)


def nonuniform_model(model: nn.Module, keep: list[Tensor]) -> nn.Module:
    """A copy of `model` whose MoE layer i is a layer of `len(keep[i])` experts (its kept experts
    and router rows): the model the counts describe, which no config can save; padding is checked
    against it."""
    new = copy.deepcopy(model)
    for (name, moe), index in zip(find_moe_layers(new), keep, strict=True):
        spec = dataclasses.replace(moe.config.router, num_experts=int(index.numel()))
        layer = MoE(dataclasses.replace(moe.config, router=spec)).to(next(moe.parameters()).dtype)
        index = index.to(torch.long)
        state = moe.state_dict()
        per_expert = set(layer_tensors(name, moe))
        state = {k: (v.index_select(0, index) if k in per_expert else v) for k, v in state.items()}
        layer.load_state_dict(state, strict=True)
        parent, _, attr = name.rpartition(".")
        setattr(new.get_submodule(parent) if parent else new, attr, layer.train(moe.training))
    return new
