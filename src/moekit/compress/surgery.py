"""Rewrite a model's routed experts and router rows together, into a new model of the same class.

Compression methods compute, per MoE layer, the new expert tensors (`experts.w_in`, `w_out`,
optional biases) and router rows (`router.weight`, optional `bias`, `selection_bias`), all with
the same new expert count; `rebuild` puts them into a copy of the model whose config says that
count. Every MoE layer of a model shares one `MoEConfig`, as the HF families' configs have one
scalar expert count: per-layer counts cannot be expressed, so all layers keep the same number.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from moekit.analysis.recorder import find_moe_layers
from moekit.errors import MoekitError
from moekit.layer import MoE

EXPERT_TENSORS = ("experts.w_in", "experts.w_out", "experts.b_in", "experts.b_out")
ROUTER_TENSORS = ("router.weight", "router.bias", "router.selection_bias")


def layer_tensors(name: str, moe: MoE) -> dict[str, Tensor]:
    """The per-expert tensors of one layer by local name (dim 0 indexes experts); refuses routers
    that carry other per-expert state, which surgery would not know how to rewrite."""
    state = moe.state_dict()
    known = set(EXPERT_TENSORS) | set(ROUTER_TENSORS)
    other = [k for k in state if k.startswith(("router.", "experts.")) and k not in known]
    if other:
        raise MoekitError(
            f"{name}: router/experts tensor {other[0]!r} is not one compression can rewrite "
            f"(router kind {moe.config.router_kind!r}, experts kind {moe.config.experts_kind!r})"
        )
    return {k: v.detach() for k, v in state.items() if k in known}


def with_num_experts(config: Any, num_experts: int) -> Any:
    """The model config (LMConfig or FamilyConfig) with every MoE layer's expert count changed."""
    moe = config.moe
    router = dataclasses.replace(moe.router, num_experts=num_experts)
    return dataclasses.replace(config, moe=dataclasses.replace(moe, router=router))


def build_like(model: nn.Module, config: Any, state: dict[str, Tensor]) -> nn.Module:
    """A new model of `model`'s class built from `config` holding exactly `state` (eval mode)."""
    from moekit.interop.model import FamilyModel

    if isinstance(model, FamilyModel):
        from moekit.interop.hf import _build

        if config.tie_embeddings:  # the tied head is the embedding: state_dict lists it twice
            state = {k: v for k, v in state.items() if k != "head.weight"}
        return _build(config, state, "compressed model")
    new = type(model)(config)
    new.load_state_dict(state, strict=True)
    return new.eval()


def rebuild(model: nn.Module, layers: list[dict[str, Tensor]], num_experts: int) -> nn.Module:
    """A copy of `model` whose MoE layers hold `layers[i]` (local name -> tensor with
    `num_experts` rows) in place of their router rows and experts."""
    moe_layers = find_moe_layers(model)
    if len(layers) != len(moe_layers):
        raise MoekitError(f"surgery: got tensors for {len(layers)} layers, the model has {len(moe_layers)}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for (name, moe), tensors in zip(moe_layers, layers, strict=True):
        expected = layer_tensors(name, moe)
        if set(tensors) != set(expected):
            raise MoekitError(f"{name}: surgery got {sorted(tensors)}, expected {sorted(expected)}")
        for key, tensor in tensors.items():
            if tensor.shape[0] != num_experts or tensor.shape[1:] != expected[key].shape[1:]:
                raise MoekitError(
                    f"{name}.{key}: shape {tuple(tensor.shape)} does not fit {num_experts} experts"
                )
            state[f"{name}.{key}"] = tensor.to(expected[key].dtype).contiguous()
    try:
        config = with_num_experts(model.config, num_experts)
    except ValueError as exc:
        raise MoekitError(f"the compressed model's config is invalid: {exc}") from None
    new = build_like(model, config, state)
    new.train(model.training)
    return new


def select_rows(model: nn.Module, keep: list[Tensor]) -> nn.Module:
    """Keep, in each MoE layer, the experts `keep[i]` (sorted indices, the same count in every
    layer), with their router rows: the pruned model."""
    counts = {int(k.numel()) for k in keep}
    if len(counts) != 1:
        raise MoekitError(f"surgery: every layer must keep the same number of experts, got {sorted(counts)}")
    layers = []
    for (name, moe), index in zip(find_moe_layers(model), keep, strict=True):
        index = index.to(torch.long)
        layers.append({k: v.index_select(0, index.to(v.device)) for k, v in layer_tensors(name, moe).items()})
    return rebuild(model, layers, counts.pop())
