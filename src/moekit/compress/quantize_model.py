"""Quantize every routed expert of a model (router, attention and shared experts stay as they are).

Each expert's `w_in` is quantized against the second moment of the layer input and its `w_out`
against that of the expert's intermediate activation: from the tokens routed to it ("routed",
plain GPTQ) or from every token weighted by its routing probability ("affinity", MoEQuant's
affinity-guided quantization, Hu et al. 2025, Eq. 8), which also gives experts that calibration
rarely routes a usable Hessian. The result is the fake-quantized model (dequantized weights, for
evaluation and HF export) plus the same weights as packed codes and scales (`QuantizedExperts`,
one per layer) that moekit runs without the float experts (`QuantizeResult.packed_model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from moekit.analysis.recorder import find_moe_layers
from moekit.analysis.super_experts import find_super_experts
from moekit.compress.calibrate import Calibration, ExpertStats
from moekit.compress.quantize import Quantized, allocate_bits, gptq, output_error, rtn
from moekit.compress.recipe import QuantizeRecipe
from moekit.compress.storage import expert_tensors
from moekit.compress.surgery import layer_tensors, rebuild
from moekit.errors import MoekitError
from moekit.experts.quantized import QuantizedExperts


def _hessians(stats: ExpertStats, e: int, kind: str) -> tuple[Tensor, Tensor]:
    if stats.hessian_in is None:
        raise MoekitError(
            "quantize: the calibration was recorded without Hessians (calibrate(hessians=True))"
        )
    if kind == "affinity":
        return stats.hessian_in_affinity[e], stats.hessian_mid_affinity[e]
    return stats.hessian_in[e], stats.hessian_mid[e]


def quantize_expert(
    w_in: Tensor, w_out: Tensor, h_in: Tensor, h_mid: Tensor, bits: int, recipe: QuantizeRecipe
) -> tuple[Quantized, Quantized]:
    if recipe.algorithm == "rtn":
        return rtn(w_in, bits, recipe.group_size), rtn(w_out, bits, recipe.group_size)
    return gptq(w_in, h_in, bits, recipe.group_size), gptq(w_out, h_mid, bits, recipe.group_size)


def super_expert_mask(calibration: Calibration) -> list[Tensor]:
    """Per layer, bool [E]: the super experts of #42 from the calibration's output maxima."""
    found = find_super_experts([s.output_max for s in calibration.layers])
    masks = [torch.zeros(s.num_experts, dtype=torch.bool) for s in calibration.layers]
    for layer, expert in found:
        masks[layer][expert] = True
    return masks


@dataclass
class QuantizeResult:
    model: nn.Module
    bits: list[list[int]]  # per layer, per expert
    packed: dict[str, Tensor] = field(default_factory=dict)
    bytes_before: int = 0  # routed experts in the source dtype
    bytes_after: int = 0  # packed codes + scales + zero points
    protected: list[list[int]] = field(default_factory=list)
    experts: list[QuantizedExperts] = field(default_factory=list)  # per layer, the packed form

    def packed_model(self) -> nn.Module:
        """The quantized model holding only packed experts (dense tensors shared with `model`)."""
        from moekit.compress.storage import with_quantized_experts

        return with_quantized_experts(self.model, self.experts)


def choose_bits(
    model: nn.Module, calibration: Calibration, recipe: QuantizeRecipe, protect: list[Tensor]
) -> list[list[int]]:
    """Uniform `recipe.bits`, or the MC-MoE integer program over every expert of every layer at
    `recipe.mean_bits`, its cost the affinity-weighted output error of each choice."""
    layers = find_moe_layers(model)
    if recipe.mean_bits is None:
        return [[recipe.bits] * moe.experts.num_experts for _, moe in layers]
    costs, sizes, forced = [], [], []
    for (name, moe), stats, guard in zip(layers, calibration.layers, protect, strict=True):
        tensors = layer_tensors(name, moe)
        for e in range(stats.num_experts):
            w_in, w_out = tensors["experts.w_in"][e], tensors["experts.w_out"][e]
            h_in, h_mid = stats.hessian_in_affinity[e], stats.hessian_mid_affinity[e]
            row = []
            for bits in recipe.choices:
                q_in, q_out = quantize_expert(w_in, w_out, *_hessians(stats, e, recipe.hessian), bits, recipe)
                row.append(
                    output_error(w_in, q_in.dequantize(), h_in)
                    + output_error(w_out, q_out.dequantize(), h_mid)
                )
            costs.append(row)
            sizes.append(w_in.numel() + w_out.numel())
            forced.append(bool(guard[e]))
    chosen = allocate_bits(
        np.array(costs),
        list(recipe.choices),
        np.array(sizes, dtype=float),
        recipe.mean_bits,
        np.array(forced),
    )
    per_layer, start = [], 0
    for _, moe in layers:
        n = moe.experts.num_experts
        per_layer.append([int(b) for b in chosen[start : start + n]])
        start += n
    return per_layer


def quantize_model(
    model: nn.Module, calibration: Calibration, recipe: QuantizeRecipe, bits: list[list[int]] | None = None
) -> QuantizeResult:
    """Quantize every routed expert by `recipe`; `bits` (per layer, per expert) overrides the
    recipe's choice (used to compare an allocation with a control of the same size)."""
    layers = find_moe_layers(model)
    protect = super_expert_mask(calibration) if recipe.protect_super_experts else [
        torch.zeros(s.num_experts, dtype=torch.bool) for s in calibration.layers
    ]  # fmt: skip
    if bits is None:
        bits = choose_bits(model, calibration, recipe, protect)
        if recipe.mean_bits is None:
            widest = max(recipe.choices + ((recipe.bits,) if recipe.bits else ()))
            bits = [
                [widest if guard[e] else b for e, b in enumerate(row)]
                for row, guard in zip(bits, protect, strict=True)
            ]
    new_layers, packed, quantized = [], {}, []
    before = after = 0
    for (name, moe), stats, layer_bits in zip(layers, calibration.layers, bits, strict=True):
        tensors = layer_tensors(name, moe)
        w_in, w_out = tensors["experts.w_in"].clone(), tensors["experts.w_out"].clone()
        source = moe.experts
        held = QuantizedExperts(
            source.num_experts, source.hidden_size, source.ff_size, source.activation, layer_bits,
            recipe.group_size, bias="experts.b_in" in tensors,
        )  # fmt: skip
        if held.b_in is not None:
            held.b_in.data.copy_(tensors["experts.b_in"])
            held.b_out.data.copy_(tensors["experts.b_out"])
        for e, b in enumerate(layer_bits):
            h_in, h_mid = _hessians(stats, e, recipe.hessian) if recipe.algorithm == "gptq" else (None, None)
            q_in, q_out = quantize_expert(w_in[e], w_out[e], h_in, h_mid, b, recipe)
            for part, q, target in (("in", q_in, w_in), ("out", q_out, w_out)):
                target[e] = q.dequantize().to(target.dtype)
                held.set_expert(e, part, q.codes, q.scales, q.zeros)
                after += q.packed_bytes()
            before += (w_in[e].numel() + w_out[e].numel()) * tensors["experts.w_in"].element_size()
        packed.update(expert_tensors(name, held))
        quantized.append(held)
        new_layers.append({**tensors, "experts.w_in": w_in, "experts.w_out": w_out})
    num = layers[0][1].experts.num_experts
    result = QuantizeResult(rebuild(model, new_layers, num), bits, packed, before, after, experts=quantized)
    result.protected = [torch.nonzero(g).flatten().tolist() for g in protect]
    return result
