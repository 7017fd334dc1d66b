"""The routing trace: what every MoE layer decided for every real token of a dataset, on disk.

A trace keeps, per token (padding removed, in the order the batches were recorded): its token id,
its position in its document piece, its column and row (sequence) in the batch, a document id
unique within the trace and a domain label (-1 when unknown). Per MoE layer it keeps each token's
chosen experts in preference order, padded to the widest token with -1 so variable-k routers fit,
their weights, which of them capacity dropped, the router's entropy and top-k margin, optionally
the full score matrix, and optionally the largest expert output magnitude per expert (for super
experts). Saved as `trace.safetensors` (tensors) + `trace.json` (shapes, names, metadata).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.errors import MoekitError
from moekit.io import load_tensors, read_json, save_tensors_atomic, write_json_atomic
from moekit.routing.record import Routing

TRACE_FORMAT = "moekit-routing-trace"
TRACE_VERSION = 1
TENSORS_FILE = "trace.safetensors"
INDEX_FILE = "trace.json"
TOKEN_FIELDS = ("token_ids", "positions", "columns", "sequences", "doc_ids", "domains")


@dataclass
class LayerTrace:
    """One MoE layer over the trace's N tokens.

    - `experts` [N, k] int64: chosen experts by preference (slot 0 = the token's best), -1 = none.
    - `weights` [N, k] fp32: their combine weights (0 where -1).
    - `dropped` [N, k] bool: the assignment was chosen but removed by capacity.
    - `entropy` [N] fp32: entropy (nats) of the token's routing distribution.
    - `margin` [N] fp32: weakest chosen minus strongest unchosen probability (NaN if undefined).
    - `scores` [N, E] fp32 or None: the router's score matrix, when recorded.
    - `activation_max` [E] fp32 or None: max |expert output| over the tokens each expert processed.
    - `activation_token` [E] int64 or None: the trace token where that maximum occurred (-1 if none).
    """

    name: str
    num_experts: int
    num_compute_experts: int
    experts: Tensor
    weights: Tensor
    dropped: Tensor
    entropy: Tensor
    margin: Tensor
    scores: Tensor | None = None
    activation_max: Tensor | None = None
    activation_token: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def width(self) -> int:
        """The largest number of experts any token chose (k for a fixed top-k router)."""
        return int(self.experts.shape[1])

    @property
    def top1(self) -> Tensor:
        """Each token's preferred expert, int64 [N]; -1 for a token that chose none."""
        if self.width == 0:
            return torch.full((self.num_tokens,), -1, dtype=torch.long)
        return self.experts[:, 0]

    @property
    def kept(self) -> Tensor:
        """bool [N, k]: the slot holds an assignment that expert compute processed."""
        return (self.experts >= 0) & ~self.dropped

    def load(self, compute_only: bool = True) -> Tensor:
        """Kept assignments per expert, int64 [E] (or [num_compute_experts])."""
        counts = torch.bincount(self.experts[self.kept], minlength=self.num_experts)
        return counts[: self.num_compute_experts] if compute_only else counts


@dataclass
class RoutingTrace:
    """Per-token labels plus one `LayerTrace` per MoE layer, all over the same N tokens."""

    token_ids: Tensor
    positions: Tensor
    columns: Tensor
    sequences: Tensor
    doc_ids: Tensor
    domains: Tensor
    layers: list[LayerTrace]
    domain_names: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(self.token_ids.shape[0])
        for name in TOKEN_FIELDS:
            tensor = getattr(self, name)
            if tensor.shape != (n,):
                raise MoekitError(f"routing trace: {name} has shape {list(tensor.shape)}, expected [{n}]")
        for layer in self.layers:
            _check_layer(layer, n, f"routing trace layer {layer.name!r}")

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def layer(self, key: int | str) -> LayerTrace:
        """A layer by index or by name."""
        if isinstance(key, int):
            if not -self.num_layers <= key < self.num_layers:
                raise MoekitError(
                    f"routing trace: layer {key} out of range (the trace has {self.num_layers})"
                )
            return self.layers[key]
        for layer in self.layers:
            if layer.name == key:
                return layer
        raise MoekitError(f"routing trace: no layer named {key!r} (layers: {', '.join(self.layer_names)})")

    @property
    def num_domains(self) -> int:
        """Domain labels in use: the named ones, or 1 + the largest label seen."""
        seen = int(self.domains.max()) + 1 if self.num_tokens else 0
        return max(len(self.domain_names), seen)

    def domain_name(self, label: int) -> str:
        return self.domain_names[label] if label < len(self.domain_names) else f"domain {label}"

    def save(self, directory: Path) -> Path:
        """Write `trace.safetensors` then `trace.json` (each atomically) into `directory`."""
        directory = Path(directory)
        tensors: dict[str, Tensor] = {f"tokens.{name}": getattr(self, name) for name in TOKEN_FIELDS}
        layers = []
        for i, layer in enumerate(self.layers):
            prefix = f"layers.{i}."
            for name in ("experts", "weights", "dropped", "entropy", "margin"):
                tensors[prefix + name] = getattr(layer, name)
            optional = {}
            for name in ("scores", "activation_max", "activation_token"):
                value = getattr(layer, name)
                optional[name] = value is not None
                if value is not None:
                    tensors[prefix + name] = value
            layers.append(
                {
                    "name": layer.name,
                    "num_experts": layer.num_experts,
                    "num_compute_experts": layer.num_compute_experts,
                    "width": layer.width,
                    **{f"has_{k}": v for k, v in optional.items()},
                }
            )
        save_tensors_atomic(directory / TENSORS_FILE, tensors, metadata={"format": TRACE_FORMAT})
        index = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "num_tokens": self.num_tokens,
            "domain_names": list(self.domain_names),
            "layers": layers,
            "meta": self.meta,
        }
        write_json_atomic(directory / INDEX_FILE, index)
        return directory


def is_trace_dir(path: Path) -> bool:
    path = Path(path)
    return (path / INDEX_FILE).is_file() and (path / TENSORS_FILE).is_file()


def load_trace(directory: Path) -> RoutingTrace:
    """Read a trace written by `RoutingTrace.save`, checking every field it needs."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    index = read_json(index_path, "routing trace index")
    if not isinstance(index, dict) or index.get("format") != TRACE_FORMAT:
        raise MoekitError(f"{index_path}: not a routing trace (expected format {TRACE_FORMAT!r})")
    if index.get("version") != TRACE_VERSION:
        raise MoekitError(f"{index_path}: version {index.get('version')!r}, expected {TRACE_VERSION}")
    tensors = load_tensors(directory / TENSORS_FILE, "routing trace tensors")
    where = str(directory / TENSORS_FILE)

    def take(name: str, dtype: torch.dtype) -> Tensor:
        if name not in tensors:
            raise MoekitError(f"{where}: missing tensor {name!r}")
        tensor = tensors[name]
        if tensor.dtype != dtype:
            raise MoekitError(f"{where}: {name} has dtype {tensor.dtype}, expected {dtype}")
        return tensor

    layer_entries = index.get("layers")
    if not isinstance(layer_entries, list):
        raise MoekitError(f"{index_path}: 'layers' should be a list")
    layers = []
    for i, entry in enumerate(layer_entries):
        if not isinstance(entry, dict) or not {"name", "num_experts", "num_compute_experts"} <= set(entry):
            raise MoekitError(
                f"{index_path}: layers[{i}] should have name, num_experts and num_compute_experts"
            )
        prefix = f"layers.{i}."
        optional = {
            "scores": torch.float32,
            "activation_max": torch.float32,
            "activation_token": torch.int64,
        }
        layers.append(
            LayerTrace(
                name=str(entry["name"]),
                num_experts=int(entry["num_experts"]),
                num_compute_experts=int(entry["num_compute_experts"]),
                experts=take(prefix + "experts", torch.int64),
                weights=take(prefix + "weights", torch.float32),
                dropped=take(prefix + "dropped", torch.bool),
                entropy=take(prefix + "entropy", torch.float32),
                margin=take(prefix + "margin", torch.float32),
                **{
                    name: take(prefix + name, dtype) if entry.get(f"has_{name}") else None
                    for name, dtype in optional.items()
                },
            )
        )
    labels = {name: take(f"tokens.{name}", torch.int64) for name in TOKEN_FIELDS}
    domain_names = index.get("domain_names", [])
    if not isinstance(domain_names, list) or not all(isinstance(d, str) for d in domain_names):
        raise MoekitError(f"{index_path}: 'domain_names' should be a list of strings")
    try:
        trace = RoutingTrace(
            **labels, layers=layers, domain_names=tuple(domain_names), meta=dict(index.get("meta") or {})
        )
    except MoekitError as exc:
        raise MoekitError(f"{where}: {exc}") from None
    if trace.num_tokens != index.get("num_tokens"):
        raise MoekitError(
            f"{index_path}: num_tokens is {index.get('num_tokens')!r} but the tensors hold {trace.num_tokens}"
        )
    return trace


def _check_layer(layer: LayerTrace, n: int, where: str) -> None:
    k = layer.width
    expected = {
        "experts": (n, k),
        "weights": (n, k),
        "dropped": (n, k),
        "entropy": (n,),
        "margin": (n,),
        "scores": (n, layer.num_experts),
        "activation_max": (layer.num_experts,),
        "activation_token": (layer.num_experts,),
    }
    for name, shape in expected.items():
        tensor = getattr(layer, name)
        if tensor is not None and tuple(tensor.shape) != shape:
            raise MoekitError(f"{where}: {name} has shape {list(tensor.shape)}, expected {list(shape)}")
    if not 0 <= layer.num_compute_experts <= layer.num_experts:
        raise MoekitError(f"{where}: num_compute_experts must be within [0, num_experts]")
    if layer.experts.numel() and (
        int(layer.experts.max()) >= layer.num_experts or int(layer.experts.min()) < -1
    ):
        raise MoekitError(f"{where}: expert ids must be -1 or within [0, {layer.num_experts})")


def routing_slots(routing: Routing) -> tuple[Tensor, Tensor, Tensor]:
    """Each token's chosen experts as [T, k] (expert ids, weights, dropped flags), best first.

    Kept and dropped assignments are merged and ordered per token by `rank`, the token's
    preference order. When `rank` is not a per-token order (expert-choice routing, where it is the
    token's place in the expert's order), they are ordered by weight instead. Tokens with fewer
    than k choices are padded with expert -1, weight 0."""
    kept, dropped = routing.kept, routing.dropped
    num_tokens = routing.num_tokens
    token = torch.cat([kept.token, dropped.token]).cpu()
    expert = torch.cat([kept.expert, dropped.expert]).cpu()
    weight = torch.cat([kept.weight, dropped.weight]).detach().float().cpu()
    rank = torch.cat([kept.rank, dropped.rank]).cpu()
    flag = torch.cat([torch.zeros(len(kept), dtype=torch.bool), torch.ones(len(dropped), dtype=torch.bool)])
    if token.numel() == 0:
        return (
            torch.full((num_tokens, 0), -1, dtype=torch.long),
            torch.zeros(num_tokens, 0),
            torch.zeros(num_tokens, 0, dtype=torch.bool),
        )
    counts = torch.bincount(token, minlength=num_tokens)
    starts = torch.cumsum(counts, 0) - counts
    by_weight = torch.argsort(-weight, stable=True)
    order = by_weight[torch.argsort(token[by_weight] * (int(rank.max()) + 1) + rank[by_weight], stable=True)]
    slot = torch.arange(token.numel()) - starts[token[order]]
    if not torch.equal(rank[order], slot):  # rank is not each token's 0, 1, ... order
        order = by_weight[torch.argsort(token[by_weight], stable=True)]
    token, expert, weight, flag = token[order], expert[order], weight[order], flag[order]
    width = int(counts.max())
    experts = torch.full((num_tokens, width), -1, dtype=torch.long)
    weights = torch.zeros(num_tokens, width)
    flags = torch.zeros(num_tokens, width, dtype=torch.bool)
    experts[token, slot] = expert
    weights[token, slot] = weight
    flags[token, slot] = flag
    return experts, weights, flags


def pad_slots(tensor: Tensor, width: int, fill: float | int | bool) -> Tensor:
    """Widen [N, k] to [N, width] with `fill` (for concatenating parts of different k)."""
    if tensor.shape[1] == width:
        return tensor
    pad = torch.full((tensor.shape[0], width - tensor.shape[1]), fill, dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=1)


def concat_layers(parts: Sequence[LayerTrace]) -> LayerTrace:
    """One layer's trace pieces (same layer, consecutive token ranges) joined into one."""
    first = parts[0]
    width = max(p.width for p in parts)
    with_scores = all(p.scores is not None for p in parts)
    return LayerTrace(
        name=first.name,
        num_experts=first.num_experts,
        num_compute_experts=first.num_compute_experts,
        experts=torch.cat([pad_slots(p.experts, width, -1) for p in parts]),
        weights=torch.cat([pad_slots(p.weights, width, 0.0) for p in parts]),
        dropped=torch.cat([pad_slots(p.dropped, width, False) for p in parts]),
        entropy=torch.cat([p.entropy for p in parts]),
        margin=torch.cat([p.margin for p in parts]),
        scores=torch.cat([p.scores for p in parts]) if with_scores else None,
    )
