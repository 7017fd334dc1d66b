"""Drop-in mode: `patch(hf_model)` runs a live transformers model's MoE blocks on moekit layers.

Each MoE block is replaced by a `PatchedMoE` that adopts the block's own submodules under their own
names, so the model's parameters, state dict, `save_pretrained` output and optimizer are exactly
what they were; its forward is a moekit `MoE` whose router and packed experts *are* the block's
parameters (the same `nn.Parameter` objects, HF v5's [E, 2I, H] / [E, H, I] layout), so training
code gets moekit's grouped expert path without a rewrite. Shared experts stay HF modules.

The moekit layer's `Routing` records (one per patched block, from the last forward) are what
`PatchHandle.routings` returns, for moekit's balancing objectives and diagnostics; HF's own outputs
are unchanged, including `output_router_logits` (the router module's forward hooks still see the
router logits). Every token is routed as transformers routes it (a left-padded position predicts
the first real token, so its output counts); the records mark padding (attention_mask == 0 in the
model call) as not real and keep only real tokens' assignments, so no statistic counts padding.

Under `torch.compile` (`fullgraph=True` included, with HF `generate`'s static KV cache) the blocks
take moekit's compile path (`moekit.dispatch.compiled`): the router-logit hooks are called directly
and the records' padding filter runs when they are read, outside the graph. A deep copy of a
patched model keeps its own padding hook and records. HF's `set_experts_implementation` does not
reach patched blocks (moekit's dispatch replaces every HF experts implementation): changing it
warns, and `unpatch()` gives transformers' implementations back.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, MoekitError
from moekit.interop.families import FAMILIES, PatchNames, family_spec
from moekit.layer import MoE, MoEConfig
from moekit.routing.record import Routing


@dataclasses.dataclass
class _ForwardState:
    """Per-handle state of the current forward: the padding mask the model was called with."""

    padding: Tensor | None = None

    def token_mask(self, leading_shape: torch.Size) -> Tensor | None:
        padding = self.padding
        if padding is None or len(leading_shape) != 2:
            return None
        batch, seq = leading_shape
        if padding.shape[0] != batch or padding.shape[1] < seq:
            return None
        return padding[:, padding.shape[1] - seq :].reshape(-1)

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the base model: remember its 2-D `attention_mask`. A bound method,
        so that `copy.deepcopy` of the model gives the copy's hook the copy's state."""
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.padding = mask.to(torch.bool) if isinstance(mask, Tensor) and mask.dim() == 2 else None


def _real_tokens_only(routing: Routing, real: Tensor) -> Routing:
    """The record restricted to real tokens (`real` [T] bool): what balancing statistics read."""
    return dataclasses.replace(
        routing,
        kept=routing.kept.select(real[routing.kept.token]),
        dropped=routing.dropped.select(real[routing.dropped.token]),
        token_mask=real,
    )


def _router_outputs(routing: Routing, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(logits, top-k weights, top-k ids) in HF's router layout; tokens without experts get id -1."""
    kept = routing.kept
    ids = torch.full((routing.num_tokens, top_k), -1, dtype=torch.long, device=routing.logits.device)
    weights = routing.logits.new_zeros(routing.num_tokens, top_k)
    ids[kept.token, kept.rank] = kept.expert
    weights = weights.index_put((kept.token, kept.rank), kept.weight)
    return routing.logits, weights, ids


def _announce(module: nn.Module, inputs: Tensor, output: tuple[Tensor, ...]) -> None:
    """Call `module` with a forward that returns `output`, so that the hooks on it (transformers'
    router-logit recorder among them) see what the moekit router computed. Under compile, where
    swapping a module's forward breaks the graph, its forward hooks are called directly."""
    if torch.compiler.is_compiling():
        for hook in module._forward_hooks.values():
            hook(module, (inputs,), output)
        return
    previous = module.__dict__.get("forward")  # e.g. accelerate's hook, which must survive
    module.forward = lambda *args, **kwargs: output
    try:
        module(inputs)
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


class PatchedMoE(nn.Module):
    """A transformers MoE block computed by a moekit `MoE` that holds the block's parameters."""

    def __init__(self, block: nn.Module, names: PatchNames, config: MoEConfig, state: _ForwardState):
        super().__init__()
        own = [n for n, _ in block.named_parameters(recurse=False)] + [
            n for n, _ in block.named_buffers(recurse=False)
        ]
        if own:
            raise MoekitError(f"{type(block).__name__}: unexpected own tensors {own}; cannot patch it")
        for name, child in block.named_children():
            self.add_module(name, child)
        self.names = names
        self.original_class = type(block).__name__
        # (the record over every token, the real-token mask or None) from the last forward
        self._last: tuple[Routing, Tensor | None] | None = None
        self._experts_implementation = self._hf_experts_implementation()
        # Held outside the module tree: its parameters are the block's, registered above already.
        with torch.device("meta"):
            self._layer = (MoE(config),)
        self._state = state
        self._bind()
        self.moe.train(block.training)

    @property
    def moe(self) -> MoE:
        return self._layer[0]

    def _bind(self) -> None:
        """Point the moekit layer at the block's current tensors (cheap; survives `.to()`/reloads)."""
        moe, router, experts = self.moe, getattr(self, self.names.router), getattr(self, self.names.experts)
        moe.router.weight = router.weight
        if moe.config.router.router_bias:
            moe.router.bias = router.bias
        if moe.config.router.selection_bias:
            moe.router.selection_bias = router.e_score_correction_bias
        moe.experts.w_in = experts.gate_up_proj
        moe.experts.w_out = experts.down_proj

    @property
    def last_routing(self) -> Routing | None:
        """The routing record of the last forward, padding left out (see `patch`)."""
        if self._last is None:
            return None
        routing, real = self._last
        return routing if real is None else _real_tokens_only(routing, real)

    def train(self, mode: bool = True) -> PatchedMoE:
        super().train(mode)
        self.moe.train(mode)  # held outside the module tree, so `train()` would not reach it
        return self

    def _hf_experts_implementation(self) -> str | None:
        config = getattr(getattr(self, self.names.experts), "config", None)
        return getattr(config, "_experts_implementation", None)

    def _warn_if_experts_implementation_changed(self) -> None:
        current = self._hf_experts_implementation()
        if current != self._experts_implementation:
            self._experts_implementation = current
            warnings.warn(
                f"moekit.patch: experts_implementation={current!r} does not apply to patched "
                f"{self.original_class} blocks: moekit's dispatch (backend={self.moe.config.backend!r}) "
                "runs them; call unpatch() on the patch handle for transformers' implementations",
                UserWarning,
                stacklevel=3,
            )

    def forward(self, hidden_states: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():  # under compile the tensors stay bound from eager use
            self._bind()
            self._warn_if_experts_implementation_changed()
        moe = self.moe
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        y, routing = moe.forward_with_routing(flat)
        _announce(getattr(self, self.names.router), flat, _router_outputs(routing, moe.config.router.top_k))
        real = self._state.token_mask(shape[:-1])
        if self.names.shared is not None:
            shared = getattr(self, self.names.shared)(flat)
            if self.names.shared_gate is not None:
                shared = torch.sigmoid(getattr(self, self.names.shared_gate)(flat)) * shared
            y = y + shared
        self._last = (routing, real)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return f"moekit patch of {self.original_class}, backend={self.moe.config.backend}"


class PatchHandle:
    """What `patch` returns: the patched blocks, their routing records, and `unpatch()`.

    Usable as a context manager (`with moekit.patch(model) as handle: ...` unpatches on exit).
    """

    def __init__(
        self, model: nn.Module, replaced: list[tuple[nn.Module, str, nn.Module, PatchedMoE]], hooks: list
    ):
        self.model = model
        self._replaced = replaced
        self._hooks = hooks

    @property
    def blocks(self) -> list[PatchedMoE]:
        return [patched for *_, patched in self._replaced]

    @property
    def moe_layers(self) -> nn.ModuleList:
        """The moekit layers (sharing the model's parameters), in layer order; e.g. for
        `moekit.balance.apply_bias_updates(handle.moe_layers, counts, rate)`."""
        return nn.ModuleList(block.moe for block in self.blocks)

    @property
    def routings(self) -> list[Routing]:
        """One `Routing` per patched block from the model's last forward, in layer order."""
        records = [block.last_routing for block in self.blocks]
        if any(r is None for r in records):
            raise MoekitError("no routing recorded yet: run a forward of the patched model first")
        return records

    @property
    def active(self) -> bool:
        return bool(self._replaced)

    def unpatch(self) -> None:
        """Put the original transformers blocks back (they share the same parameters)."""
        for parent, name, original, _ in self._replaced:
            setattr(parent, name, original)
        for hook in self._hooks:
            hook.remove()
        self._replaced, self._hooks = [], []

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unpatch()


def patchable_families() -> list[str]:
    return [name for name, spec in FAMILIES.items() if spec.patch is not None]


def patch(model: nn.Module, *, backend: str = "auto", record_padding: bool = False) -> PatchHandle:
    """Swap every MoE block of a live transformers model for a moekit layer on the same weights.

    Logits and gradients equal the unpatched model's; `backend` picks moekit's expert dispatch.
    The routing records leave padding out (read from the `attention_mask` the model is called
    with) unless `record_padding` is true.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise MoekitError(f"patch: expected a transformers model with a config, got {type(model).__name__}")
    spec = family_spec(model_type, "patch")
    if spec.patch is None:
        raise MoekitError(
            f"patch: {spec.name} is not patchable: {spec.patch_note}. "
            f"Patchable families: {', '.join(patchable_families())}"
        )
    if any(isinstance(m, PatchedMoE) for m in model.modules()):
        raise MoekitError("patch: this model is already patched (call unpatch() on its handle first)")
    try:  # the MoE block's settings only: attention and RoPE settings are not patch's business
        moe_config = spec.read_moe(config)
    except ConfigError as exc:
        raise exc.renamed(f"patch: {spec.name} config {exc.field}") from None
    moe_config = dataclasses.replace(moe_config, num_shared_experts=0, shared_gate=False, backend=backend)
    state = _ForwardState()
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ != spec.patch.block_class:
                continue
            _check_layout(child, spec.patch, moe_config, f"{parent_name}.{name}".lstrip("."))
            patched = PatchedMoE(child, spec.patch, moe_config, state)
            setattr(parent, name, patched)
            replaced.append((parent, name, child, patched))
    if not replaced:
        raise MoekitError(f"patch: found no {spec.patch.block_class} block in this {spec.name} model")
    hooks = []
    if not record_padding:
        target = getattr(model, "base_model", model)
        hooks.append(target.register_forward_pre_hook(state.capture, with_kwargs=True))
    return PatchHandle(model, replaced, hooks)


def _check_layout(block: nn.Module, names: PatchNames, config: MoEConfig, where: str) -> None:
    experts = getattr(block, names.experts, None)
    e, h, i = config.router.num_experts, config.hidden_size, config.ff_size
    expected = {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}
    for attr, shape in expected.items():
        tensor = getattr(experts, attr, None)
        if not isinstance(tensor, nn.Parameter) or tuple(tensor.shape) != shape:
            got = None if tensor is None else tuple(tensor.shape)
            raise MoekitError(
                f"patch: {where}.{names.experts}.{attr}: expected a parameter of shape {shape}, got {got}"
            )
