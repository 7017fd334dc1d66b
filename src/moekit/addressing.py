"""Finding a model's MoE layers: the one walker that overrides, the routing recorder, expert
parallelism and balancing use, so that "layer 3" means the same layer everywhere.

Layers are numbered in module order (= depth order for every moekit model and every family
`moekit.from_hf` loads), counting MoE layers only: index 0 is the first MoE layer, whatever dense
layers precede it.
"""

from __future__ import annotations

from torch import nn

from moekit.errors import MoekitError
from moekit.layer import MoE


def moe_layers(model: nn.Module) -> list[tuple[int, str, MoE]]:
    """(index, module name, layer) of every moekit MoE layer of `model`, in module order."""
    found = [(name or "moe", m) for name, m in model.named_modules() if isinstance(m, MoE)]
    return [(index, name, layer) for index, (name, layer) in enumerate(found)]


def require_moe_layers(model: nn.Module, purpose: str = "this") -> list[tuple[int, str, MoE]]:
    """`moe_layers`, or a MoekitError naming the model when it has none."""
    layers = moe_layers(model)
    if not layers:
        raise MoekitError(
            f"{type(model).__name__}: no moekit MoE layers found; {purpose} needs a model whose MoE "
            "FFNs are moekit.MoE (a moekit model, or an HF model loaded with moekit.from_hf)"
        )
    return layers


def resolve_layer(model_layers: list[tuple[int, str, MoE]], key: int | str) -> int:
    """The MoE-layer index of `key`: an index (negative counts from the end) or a module name."""
    count = len(model_layers)
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise MoekitError(f"layer key {key!r}: expected an MoE-layer index or a module name")
    if isinstance(key, int):
        if not -count <= key < count:
            raise MoekitError(f"layer {key}: the model has {count} MoE layers (indices 0..{count - 1})")
        return key % count
    for index, name, _ in model_layers:
        if name == key:
            return index
    names = ", ".join(name for _, name, _ in model_layers[:4])
    raise MoekitError(f"layer {key!r}: no MoE layer of that name (names look like {names})")
