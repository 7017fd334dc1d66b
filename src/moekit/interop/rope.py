"""Rotary position embeddings as HF transformers computes them, for the families moekit imports.

Frequencies follow `transformers.modeling_rope_utils` (default, linear, yarn, llama3) so that an
imported model sees the very same cos/sin tables; `attention_scaling` multiplies cos and sin
(YaRN's attention factor). Three layouts rotate the features: `half` pairs feature i with i + d/2
(Llama and almost everyone); `interleaved` pairs 2i with 2i+1 and writes the rotated pairs back as
[evens | odds] (DeepSeek's `rope_interleave`); `complex` pairs 2i with 2i+1 and keeps them in place
(Llama 4's complex-number rotation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from moekit.errors import ConfigError, require_choice, require_int, require_number
from moekit.kernels import rope as rope_kernel

ROPE_KINDS = ("default", "linear", "yarn", "llama3")
ROPE_LAYOUTS = ("half", "interleaved", "complex")


@dataclass(frozen=True)
class RopeConfig:
    """`params` holds the HF `rope_parameters` entries the kind reads (factor, beta_fast, ...)."""

    dim: int
    theta: float
    kind: str = "default"
    params: dict[str, Any] = field(default_factory=dict)
    max_position_embeddings: int = 4096
    layout: str = "half"

    def __post_init__(self) -> None:
        require_int("rope.dim", self.dim, minimum=2)
        if self.dim % 2:
            raise ConfigError("rope.dim", f"got {self.dim}, expected an even number")
        require_number("rope.theta", self.theta, minimum=0.0, strict=True)
        require_choice("rope.kind", self.kind, ROPE_KINDS)
        require_choice("rope.layout", self.layout, ROPE_LAYOUTS)
        require_int("rope.max_position_embeddings", self.max_position_embeddings, minimum=1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inverse_frequencies(rope: RopeConfig) -> tuple[Tensor, float]:
    """(inv_freq [dim/2] fp32, attention scaling) exactly as transformers computes them."""
    dim, base = rope.dim, rope.theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    if rope.kind == "default":
        return inv_freq, 1.0
    params = rope.params
    if rope.kind == "linear":
        return inv_freq / _param(params, "factor"), 1.0
    if rope.kind == "llama3":
        return _llama3(inv_freq, params), 1.0
    return _yarn(rope)


def _param(params: dict[str, Any], name: str) -> Any:
    if params.get(name) is None:
        raise ConfigError(f"rope.params.{name}", "missing (needed by this rope kind)")
    return params[name]


def _llama3(inv_freq: Tensor, params: dict[str, Any]) -> Tensor:
    factor = _param(params, "factor")
    low, high = _param(params, "low_freq_factor"), _param(params, "high_freq_factor")
    old_context = _param(params, "original_max_position_embeddings")
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig) -> tuple[Tensor, float]:
    """YaRN (Peng et al. 2023), following transformers' `_compute_yarn_parameters` line by line."""
    params, dim, base = rope.params, rope.dim, rope.theta
    original = _param(params, "original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        factor = rope.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def rope_tables(
    rope: RopeConfig, positions: Tensor, dtype: torch.dtype, frequencies: tuple[Tensor, float] | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin [B, S, dim] for integer `positions` [B, S] (HF's rotary embedding forward);
    `frequencies`: `inverse_frequencies(rope)` if already computed. A scaling of 1 and a cast to
    the dtype they have are left out (the same values, two ops fewer per decoding step)."""
    inv_freq, scaling = inverse_frequencies(rope) if frequencies is None else frequencies
    if inv_freq.device != positions.device:
        inv_freq = inv_freq.to(positions.device)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    if dtype != cos.dtype:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


def half_signs(dim: int, device: torch.device | str = "cpu") -> Tensor:
    """[-1] * (dim / 2) + [1] * (dim / 2) in fp32: the signs `head_tables` gives the sine."""
    return torch.ones(dim, device=device).index_fill_(0, torch.arange(dim // 2, device=device), -1.0)


def head_tables(cos: Tensor, sin: Tensor, layout: str, signs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The [B, S, dim] tables as `apply_rope` takes them, made once per forward rather than for
    every query and key of every layer: [B, 1, S, dim] (broadcast over the heads), halved for the
    pairwise layouts, and for `half` the sine's first half negated (times `signs`, `half_signs`,
    where given in the tables' dtype), so that rotating is one swap of the halves, two products and
    a sum (transformers' `rotate_half` takes a negation, two slices and a concatenation; -a * b is
    a * -b exactly, so the values are the same)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = cos.shape[-1] // 2
    if layout in ("interleaved", "complex"):
        return cos[..., :half], sin[..., :half]
    if signs is not None and signs.dtype == sin.dtype:
        return cos, sin * signs
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, layout: str) -> Tensor:
    """Rotate [B, heads, S, dim] features by the tables of `head_tables`."""
    if layout in ("interleaved", "complex"):
        even, odd = x[..., 0::2], x[..., 1::2]
        if layout == "complex":  # (even + i odd) * (cos + i sin), as torch's complex product
            return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
        return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]: the halves swapped, signs in `sin`
    return rope_kernel.rotate_half(x, cos, sin, signed_sin=True)
