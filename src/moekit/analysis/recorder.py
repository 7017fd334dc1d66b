"""Record every MoE layer's routing over a dataset, without changing what the model computes.

The recorder attaches to every moekit `MoE` layer found in any `nn.Module` (a moekit
`LanguageModel`, an HF model loaded through `moekit.from_hf`, a model of your own). While attached,
each layer's `forward_with_routing` is shadowed on the instance by a wrapper that calls the
original and copies what the trace keeps from the (detached) `Routing` it returns: the record every
consumer of the layer sees, whatever the router (a chain-of-experts router never calls its own
forward, so a router forward hook would miss it). The wrapper returns the original result object,
so outputs are bit-identical with and without recording; leaving the `with` block removes it.
Layer calls made outside `recorder.batch(...)` are ignored, so the recorder can stay attached
during training and record only the steps you choose.

    with RoutingRecorder(model) as recorder:
        for batch in batches:
            with recorder.batch(batch):      # any object with input_ids (and token_mask, ...)
                model(batch.input_ids, ...)
    trace = recorder.trace()

or simply `trace = record_routing(model, batches)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moekit.addressing import require_moe_layers
from moekit.analysis.metrics import token_entropy, topk_margin
from moekit.analysis.super_experts import expert_output_max
from moekit.analysis.trace import LayerTrace, RoutingTrace, concat_layers, routing_slots
from moekit.errors import MoekitError
from moekit.layer import MoE
from moekit.routing.record import Routing

Forward = Callable[[nn.Module, Any], Any]


def find_moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every moekit MoE layer of `model` with its module name, in module order (= depth order)."""
    return [(name, layer) for _, name, layer in require_moe_layers(model, "routing analysis")]


def captures_activations(moe: MoE) -> bool:
    """Expert outputs can be recomputed from the layer input: the experts have `expert_forward` and
    the router routes once on that input (a chain-of-experts router routes intermediate states)."""
    return hasattr(moe.experts, "expert_forward") and not hasattr(moe.router, "route_iteratively")


def routing_probabilities(routing: Routing) -> Tensor:
    """The routing distribution over all experts, [T, E] fp32, each row summing to one: softmax
    scores as they are, sigmoid scores normalised (DeepSeek-V3's s'), raw logits softmaxed."""
    scores, logits = routing.scores.float(), routing.logits.float()
    raw = scores.numel() and (
        routing.scores.data_ptr() == routing.logits.data_ptr() or bool((scores < 0).any())
    )
    if raw:
        return torch.softmax(logits, dim=-1)
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@dataclass
class _Batch:
    """The batch being recorded: its labels flattened row-major, as the layer flattens tokens."""

    shape: tuple[int, int]
    mask: Tensor  # [B*S] bool
    labels: dict[str, Tensor]  # trace token fields, real tokens only
    trace_index: Tensor  # [B*S] int64: trace index of each flat token (-1 on padding)
    calls: list[list[LayerTrace]] = field(default_factory=list)
    routed: list[int] = field(default_factory=list)  # tokens routed so far, per layer
    peaks: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)  # per layer: max |output|, where

    @property
    def num_flat(self) -> int:
        return self.shape[0] * self.shape[1]


def _field(batch: Any, name: str) -> Tensor | None:
    if isinstance(batch, dict):
        return batch.get(name)
    return getattr(batch, name, None)


class RoutingRecorder:
    """A context manager that captures the routing of every MoE layer, batch by batch.

    `scores=True` also keeps each layer's [N, E] score matrix; `expert_activations=True` keeps, per
    expert, its largest output magnitude (for super experts, see `super_experts.py`)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        scores: bool = False,
        expert_activations: bool = False,
        domain_names: Iterable[str] = (),
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.layers = find_moe_layers(model)
        self.keep_scores = scores
        self.keep_activations = expert_activations
        self.domain_names = tuple(domain_names)
        self.meta = dict(meta or {})
        self._attached: list[tuple[MoE, Any]] = []
        self._current: _Batch | None = None
        self._parts: list[list[LayerTrace]] = [[] for _ in self.layers]
        self._labels: list[dict[str, Tensor]] = []
        self._peaks: list[tuple[Tensor, Tensor] | None] = [None for _ in self.layers]
        self._num_tokens = 0
        self._num_sequences = 0
        self._num_docs = 0

    # -- attaching ---------------------------------------------------------------------------------

    def __enter__(self) -> RoutingRecorder:
        for index, (_, moe) in enumerate(self.layers):
            shadowed = moe.__dict__.get("forward_with_routing")  # another recorder's wrapper, if any
            moe.forward_with_routing = self._wrap(index, moe.forward_with_routing)
            self._attached.append((moe, shadowed))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for moe, shadowed in reversed(self._attached):
            if shadowed is None:
                del moe.forward_with_routing
            else:
                moe.forward_with_routing = shadowed
        self._attached.clear()
        self._current = None

    def _wrap(self, index: int, forward_with_routing: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Routing]:
            y, routing = forward_with_routing(x, *args, **kwargs)
            state = self._current
            if state is not None:
                if not isinstance(routing, Routing):
                    got = type(routing).__name__
                    raise MoekitError(
                        f"{self.layers[index][0]}: the layer returned {got}, expected a Routing"
                    )
                with torch.no_grad():
                    self._capture(index, x.detach().reshape(-1, x.shape[-1]), routing.detach(), state)
            return y, routing

        return recorded

    def _capture(self, index: int, x: Tensor, routing: Routing, state: _Batch) -> None:
        name, moe = self.layers[index]
        start = state.routed[index]
        stop = start + routing.num_tokens
        if stop > state.num_flat:
            raise MoekitError(
                f"{name}: routed {stop} tokens during a batch of shape {list(state.shape)} "
                f"({state.num_flat} tokens); the recorder needs one routing per token"
            )
        state.routed[index] = stop
        real = state.mask[start:stop]
        experts, weights, dropped = routing_slots(routing)
        probabilities = routing_probabilities(routing)[real.to(routing.logits.device)].cpu()
        experts, weights, dropped = experts[real], weights[real], dropped[real]
        scores = routing.scores[real.to(routing.scores.device)].float().cpu() if self.keep_scores else None
        state.calls[index].append(
            LayerTrace(
                name=name,
                num_experts=routing.num_experts,
                num_compute_experts=routing.num_compute_experts,
                experts=experts,
                weights=weights,
                dropped=dropped,
                entropy=token_entropy(probabilities),
                margin=topk_margin(probabilities, experts),
                scores=scores,
            )
        )
        if self.keep_activations and captures_activations(moe):
            peak, local = expert_output_max(
                moe.experts,
                routing.num_experts,
                x,
                routing.compute_assignments,
                real.to(routing.logits.device),
            )
            where = torch.full_like(local, -1)
            where[local >= 0] = state.trace_index[start + local[local >= 0]]
            state.peaks[index] = _larger(state.peaks[index], (peak, where))

    # -- batches -----------------------------------------------------------------------------------

    @contextmanager
    def batch(self, batch: Any = None, **fields: Tensor | None) -> Iterator[None]:
        """Mark the model calls inside this block as the forward pass of `batch`: an object (or
        dict) with `input_ids` [B, S] and optionally `token_mask`, `positions`, `doc_ids`,
        `domains`; keyword arguments override its fields."""
        if not self._attached:
            raise MoekitError(
                "RoutingRecorder.batch: use it inside `with RoutingRecorder(model) as recorder:`"
            )
        if self._current is not None:
            raise MoekitError("RoutingRecorder.batch: batches cannot be nested")
        values = {
            name: _field(batch, name)
            for name in ("input_ids", "token_mask", "positions", "doc_ids", "domains")
        }
        values.update({k: v for k, v in fields.items() if v is not None})
        self._current = self._begin(values)
        try:
            yield
            self._finish(self._current)
        finally:
            self._current = None

    def _begin(self, values: dict[str, Tensor | None]) -> _Batch:
        input_ids = values["input_ids"]
        if input_ids is None:
            raise MoekitError("recorded batch: input_ids is required")
        input_ids = input_ids.detach().cpu().long()
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise MoekitError(
                f"recorded batch: input_ids should be [B, S], got shape {list(input_ids.shape)}"
            )
        rows, cols = input_ids.shape

        def given(name: str, default: Tensor) -> Tensor:
            value = values[name]
            if value is None:
                return default
            value = value.detach().cpu()
            if value.numel() != rows * cols:
                raise MoekitError(
                    f"recorded batch: {name} has shape {list(value.shape)}, expected {[rows, cols]}"
                )
            return value.reshape(rows, cols)

        mask = given("token_mask", torch.ones(rows, cols, dtype=torch.bool)).to(torch.bool)
        columns = torch.arange(cols).expand(rows, cols)
        doc_ids = given("doc_ids", torch.arange(rows).unsqueeze(1).expand(rows, cols)).long()
        flat_mask = mask.reshape(-1)
        real_docs = doc_ids[mask]
        doc_base = self._num_docs - (int(real_docs.min()) if real_docs.numel() else 0)
        labels = {
            "token_ids": input_ids[mask],
            "positions": given("positions", columns).long()[mask],
            "columns": columns[mask],
            "sequences": (self._num_sequences + torch.arange(rows).unsqueeze(1).expand(rows, cols))[mask],
            "doc_ids": real_docs + doc_base,
            "domains": given("domains", torch.full((rows, cols), -1)).long()[mask],
        }
        trace_index = torch.full((rows * cols,), -1, dtype=torch.long)
        trace_index[flat_mask] = self._num_tokens + torch.arange(int(flat_mask.sum()))
        return _Batch(
            shape=(rows, cols),
            mask=flat_mask,
            labels=labels,
            trace_index=trace_index,
            calls=[[] for _ in self.layers],
            routed=[0 for _ in self.layers],
            peaks=[None for _ in self.layers],
        )

    def _finish(self, state: _Batch) -> None:
        for index, (name, _) in enumerate(self.layers):
            if state.routed[index] != state.num_flat:
                raise MoekitError(
                    f"{name}: routed {state.routed[index]} tokens for a batch of shape {list(state.shape)} "
                    f"({state.num_flat} tokens); was the model called once inside recorder.batch()?"
                )
        for index in range(len(self.layers)):
            self._parts[index].append(concat_layers(state.calls[index]))
            self._peaks[index] = _larger(self._peaks[index], state.peaks[index])
        self._labels.append(state.labels)
        self._num_tokens += int(state.mask.sum())
        self._num_sequences += state.shape[0]
        docs = state.labels["doc_ids"]
        if docs.numel():
            self._num_docs = int(docs.max()) + 1

    # -- result ------------------------------------------------------------------------------------

    @property
    def num_batches(self) -> int:
        return len(self._labels)

    def trace(self) -> RoutingTrace:
        """Everything recorded so far as one `RoutingTrace`."""
        if not self._labels:
            raise MoekitError("routing recorder: no batch was recorded")
        layers = []
        for index, parts in enumerate(self._parts):
            layer = concat_layers(parts)
            if self.keep_activations and self._peaks[index] is not None:
                layer.activation_max, layer.activation_token = self._peaks[index]
            layers.append(layer)
        labels = {name: torch.cat([part[name] for part in self._labels]) for name in self._labels[0]}
        return RoutingTrace(**labels, layers=layers, domain_names=self.domain_names, meta=dict(self.meta))


def _larger(
    best: tuple[Tensor, Tensor] | None, new: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor] | None:
    """Per expert, the (max |output|, where) pair with the larger maximum."""
    if best is None or new is None:
        return new if best is None else best
    larger = new[0] > best[0]
    return torch.where(larger, new[0], best[0]), torch.where(larger, new[1], best[1])


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call `model` on a batch, passing the masks and positions its forward accepts: moekit's
    `token_mask`/`positions`/`doc_ids`, or HF's `attention_mask`/`position_ids`."""
    accepted = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {}
    token_mask, positions, doc_ids = (_field(batch, n) for n in ("token_mask", "positions", "doc_ids"))
    if token_mask is not None:
        if "token_mask" in accepted:
            kwargs["token_mask"] = token_mask
        elif "attention_mask" in accepted:
            kwargs["attention_mask"] = token_mask.long()
    if positions is not None:
        if "positions" in accepted:
            kwargs["positions"] = positions
        elif "position_ids" in accepted:
            kwargs["position_ids"] = positions
    if doc_ids is not None and "doc_ids" in accepted:
        kwargs["doc_ids"] = doc_ids
    return model(_field(batch, "input_ids"), **kwargs)


def record_routing(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Forward = default_forward,
    max_batches: int | None = None,
    scores: bool = False,
    expert_activations: bool = False,
    domain_names: Iterable[str] = (),
    meta: dict[str, Any] | None = None,
) -> RoutingTrace:
    """Run `model` in evaluation mode without gradients over `batches` (at most `max_batches`) and
    return the routing trace; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    recorder = RoutingRecorder(
        model, scores=scores, expert_activations=expert_activations, domain_names=domain_names, meta=meta
    )
    try:
        with torch.no_grad(), recorder:
            for number, batch in enumerate(batches):
                if max_batches is not None and number >= max_batches:
                    break
                with recorder.batch(batch):
                    forward(model, batch)
    finally:
        model.train(was_training)
    return recorder.trace()
