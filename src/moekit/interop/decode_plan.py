"""A one-token decoding step of a `FamilyModel` as a straight line of kernel calls, resolved once
per generation.

A step of the decode benchmark's `large` Qwen3-MoE (213 MB of weights read per token) spent about
1.5 ms of its 10-11 outside its kernels: module calls, and in every layer the checks that pick
each kernel (dtype, device, autograd, sizes, `MOEKIT_NATIVE`, override state, a joined weight's
version). Within one generation the answers do not change (the batch, the weights, the overrides
and the kernels are fixed), so `DecodePlan.build` asks once and `step` makes the calls. Measured
with the three large products memoised, so that only the rest ran (AVX2 EPYC, two threads): a
generation's step 1.45 ms through `FamilyModel.forward`, 0.84 ms through the plan.

The values are `FamilyModel.forward`'s bit for bit: the same ops on the same operands in the same
order (`tests/test_decode_plan.py`). Attention other than the joined projection's (latent,
chunked, separate projections) runs as its module; an MoE layer outside `few_rows.route_rows`
(biased or non-SwiGLU experts, the routing weight on the input, experts not on the tile kernel)
or a forward hook makes `build` return None, and the step takes the model's forward. `current`
tells a caller whether the plan still holds: a parameter changed or replaced, an override
attached or removed, or a hook registered since `build` ends it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.dispatch.few_rows import reads_of_rows_are_small, route_rows, rows_route_in_one_call, rows_routing
from moekit.inference.kv_cache import KVCache, LayerCache, step_mask
from moekit.interop.attention import Attention, RMSNorm, attend
from moekit.interop.model import DecoderLayer, FamilyModel
from moekit.kernels import attention_step, rows_linear
from moekit.kernels import rms_norm as rms_norm_kernel
from moekit.layer import MoE
from moekit.routing.override import LayerOverride

Norm = Callable[[Tensor], Tensor]
Linear = Callable[[Tensor, int], Tensor]  # (rows [B, n], threads) -> [B, out]


def _norm(module: nn.Module, sample: Tensor) -> Norm:
    """The module's norm of inputs like `sample`: moekit's RMSNorm kernel where `RMSNorm.forward`
    takes it, else the module's own forward."""
    if (
        isinstance(module, RMSNorm)
        and sample.dtype == module.weight.dtype == torch.float32
        and rms_norm_kernel.fits(sample, module.weight)
    ):
        weight, eps = module.weight.contiguous(), module.eps
        return lambda x: torch.ops.moekit.rms_norm_rows(x, weight, eps)
    return module.forward


def _linear(module: nn.Linear, sample: Tensor) -> Linear:
    """The module's product for flat rows like `sample` [B, n]: the row kernel where
    `rows_linear.decode_linear` takes it, else F.linear."""
    weight, bias = module.weight, module.bias
    if isinstance(module, rows_linear.RowsLinear) and rows_linear.fits(sample, weight, bias):
        return lambda x, threads: torch.ops.moekit.rows_linear(x, weight, bias, threads)
    return lambda x, threads: F.linear(x, weight, bias)


@dataclass
class AttentionStep:
    """`Attention.forward` of a one-token step through its joined projection and cached step."""

    attention: Attention
    weight: Tensor | None  # the joined [W_q; W_k; W_v] of small weights, else None ...
    bias: Tensor | None
    weights: list[Tensor]  # ... and the three read where they lie, in one row-kernel call
    biases: list[Tensor | None]
    norm: Tensor | None
    in_one_call: bool  # norms, rotation and cache append in one kernel call (`_cached_step`)
    out: Linear

    @classmethod
    def build(cls, layer: DecoderLayer, sample: Tensor, cos: Tensor, sin: Tensor) -> AttentionStep | None:
        """For inputs like `sample` [B, 1, hidden], or None where the forward takes another path."""
        attention = layer.attn
        if type(attention) is not Attention or layer.chunk is not None or not attention._joinable:
            return None
        joint = attention._joint_projection(sample)
        if joint is None:
            return None
        cfg = attention.config
        qkv_width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        in_one_call = (
            layer.window is None
            and attention.rope_layout == "half"
            and attention_step.fits(sample.new_empty(sample.shape[0], 1, qkv_width), cos, sin)
        )
        weight, bias, norm = joint
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        flat = sample.new_empty(sample.shape[0], cfg.num_heads * cfg.head_dim)
        return cls(
            attention,
            weight,
            bias,
            [m.weight for m in projections],
            [m.bias for m in projections],
            norm,
            in_one_call,
            _linear(attention.o_proj, flat),
        )

    def __call__(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: LayerCache, threads: int
    ) -> Tensor:
        b = x.shape[0]
        if self.weight is None:
            qkv = torch.ops.moekit.rows_linear_parts(x.view(b, -1), self.weights, self.biases, threads)
            qkv = qkv.view(b, 1, -1)
        else:
            qkv = F.linear(x, self.weight, self.bias)
        attention = self.attention
        if self.in_one_call:
            q, k, v = attention.norm_rope_append(qkv, cos, sin, cache, self.norm)
        else:
            q, k, v = attention._joint_step(qkv, cos, sin, self.norm)
            k, v = cache.update(k, v)
        cfg = attention.config
        out = attend(q, k, v, mask, cfg.softmax_scale, cfg.implementation, attention.sinks)
        return self.out(out.view(b, -1), threads).view(b, 1, -1)


@dataclass
class ModuleAttention:
    """The attention module's own forward, for the attentions `AttentionStep` does not cover
    (latent, chunked, separate projections): what `DecoderLayer.forward` calls."""

    attention: nn.Module

    def __call__(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: LayerCache, threads: int
    ) -> Tensor:
        return self.attention(x, cos, sin, mask, cache)


@dataclass
class MoEStep:
    """`MoE.forward_with_routing` of a step's rows through `few_rows.route_rows`."""

    moe: MoE
    single_thread: bool  # the experts the rows reach read faster than a thread hand-off pays
    attached: LayerOverride | None  # the layer's override at build (a capture at most)

    @classmethod
    def build(cls, moe: MoE, sample: Tensor) -> MoEStep | None:
        """For rows like `sample` [B, hidden], or None where the forward takes another path."""
        if not rows_route_in_one_call(moe, sample):
            return None
        return cls(moe, reads_of_rows_are_small(moe, sample.shape[0]), moe.routing_override)

    def __call__(self, x: Tensor, threads: int) -> Tensor:
        moe = self.moe
        y, logits, scores, kept = route_rows(moe, x, 1 if self.single_thread else threads)
        if moe.shared is not None:
            y = y + moe.shared(x)
        attached = self.attached
        if attached is not None and attached.capture is not None:
            attached.capture.add(attached.index, rows_routing(moe, x, logits, scores, kept))
        return y


@dataclass
class LayerStep:
    """`DecoderLayer.forward` of a one-token step."""

    attn_norm: Norm
    attention: AttentionStep | ModuleAttention
    ffn_norm: Norm
    moe: MoEStep | None  # None: a dense FFN, run as its module `ffn`
    ffn: nn.Module
    residual_multiplier: float

    def __call__(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: LayerCache, threads: int
    ) -> Tensor:
        a = self.attention(self.attn_norm(x), cos, sin, mask, cache, threads)
        x = x + self._scaled(a)
        h = self.ffn_norm(x)
        moe = self.moe
        h = self.ffn(h) if moe is None else moe(h.view(h.shape[0], -1), threads).view(h.shape)
        return x + self._scaled(h)

    def _scaled(self, h: Tensor) -> Tensor:
        m = self.residual_multiplier
        return h if m == 1.0 else h * m


class DecodePlan:
    """The calls of a `FamilyModel`'s one-token steps for a batch of `batch` rows."""

    def __init__(
        self, model: FamilyModel, modules: list[nn.Module], layers: list[LayerStep], norm: Norm, head: Linear
    ):
        self.model = model
        self.modules = modules  # the model's, at build
        self.layers = layers
        self.norm = norm
        self.head = head
        self.spans = {(layer.window, layer.chunk) for layer in model.layers}
        self.signature = _signature(model, modules)

    @classmethod
    def build(cls, model: nn.Module, batch: int) -> DecodePlan | None:
        """The plan of `model`'s one-token steps of `batch` rows outside autograd, or None where a
        step takes another path than the plan's (then the model's forward runs it)."""
        if type(model) is not FamilyModel or torch.is_grad_enabled() or model.training:
            return None
        modules = list(model.modules())
        if _has_hooks(modules):
            return None  # a step of the plan calls no module's hooks
        weight = model.embed.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None
        sample = weight.new_zeros(batch, 1, weight.shape[1])
        positions = torch.zeros(batch, 1, dtype=torch.long, device=weight.device)
        cos, sin = model.position_tables(positions, sample.dtype)
        layers = []
        for layer in model.layers:
            attention = AttentionStep.build(layer, sample, cos, sin) or ModuleAttention(layer.attn)
            moe = MoEStep.build(layer.ffn, sample.view(batch, -1)) if layer.is_moe else None
            if layer.is_moe and moe is None:
                return None
            layers.append(
                LayerStep(
                    _norm(layer.attn_norm, sample),
                    attention,
                    _norm(layer.ffn_norm, sample),
                    moe,
                    layer.ffn,
                    layer.residual_multiplier,
                )
            )
        head = _linear(model.head, sample.view(batch, -1))
        return cls(model, modules, layers, _norm(model.norm, sample), head)

    def current(self) -> bool:
        """Whether the plan still holds: no parameter changed in place or replaced, no override
        attached or removed and no hook registered since `build` (the modules themselves are the
        model's at `build`)."""
        return _signature(self.model, self.modules) == self.signature and not _has_hooks(self.modules)

    def step(self, ids: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        """Next-token logits [B, V] of the one-token step `ids` [B, 1] at `positions` [B, 1] (every
        token real), appending to `cache`: `FamilyModel.forward(...).logits[:, -1]`."""
        model = self.model
        config = model.config
        threads = torch.get_num_threads()
        b = ids.shape[0]
        start = cache.begin((b, 1), ids.device)
        x = F.embedding(ids, model.embed.weight)
        if config.embedding_multiplier != 1.0:
            x = x * config.embedding_multiplier
        cos, sin = model.position_tables(positions, x.dtype)
        materialise = config.attention.implementation == "eager"
        masks = {span: step_mask(cache, start, *span, materialise) for span in self.spans}
        for layer, module, layer_cache in zip(self.layers, model.layers, cache.layers, strict=True):
            x = layer(x, cos, sin, masks[module.window, module.chunk], layer_cache, threads)
        logits = self.head(self.norm(x).view(b, -1), threads)
        if config.logits_scaling != 1.0:
            logits = logits / config.logits_scaling
        return logits


def _signature(model: FamilyModel, modules: list[nn.Module]) -> tuple[tuple[int, ...], ...]:
    """What a plan depends on that code may change between steps: the parameters of the model's
    `modules` (the plan holds them, and copies of some; a walk of the module tree each step took
    0.3 ms of a step of `large`), their storage and version counters, and each MoE layer's
    attached override (by identity: the plan holds the overrides, so their ids are not reused)."""
    weights = tuple(
        (id(p), p.data_ptr(), p._version) for m in modules for p in m._parameters.values() if p is not None
    )
    overrides = tuple(id(layer.ffn.routing_override) for layer in model.layers if layer.is_moe)
    return weights, overrides


def _has_hooks(modules: list[nn.Module]) -> bool:
    """Whether a forward hook is registered on any of `modules` or globally."""
    from torch.nn.modules import module as module_state

    if module_state._global_forward_hooks or module_state._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
