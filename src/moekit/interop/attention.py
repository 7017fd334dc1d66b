"""Attention as the HF MoE families implement it: grouped-query attention with its variants
(biases, fused QKV, QK-norm per head or over the projection, QKV clipping, attention sinks,
sliding windows) and DeepSeek's multi-head latent attention (MLA).

Each variant repeats the arithmetic of the transformers module it stands for, in the same order,
so that an imported model reproduces the original's logits to rounding. The kernel is SDPA
(transformers' default) or the eager matmul-softmax path (needed for sinks, as in GPT-OSS).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.device import autocast_dtype
from moekit.dispatch.workers import too_small_to_share
from moekit.errors import ConfigError, require_choice, require_int
from moekit.inference.kv_cache import LayerCache
from moekit.interop.rope import apply_rope
from moekit.kernels import attention_step
from moekit.kernels import rms_norm as rms_norm_kernel
from moekit.kernels.rows_linear import RowsLinear, linear_parts, parts_fit
from moekit.routing.importance import attention_received

ATTENTION_KINDS = ("gqa", "mla")
QK_NORMS = ("none", "per_head", "whole", "l2")
IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class AttentionConfig:
    """One attention flavour.

    - `qk_norm`: RMSNorm of queries and keys over each head (Qwen3) or over the whole
      projection (OLMoE), or a weightless L2 norm per head after RoPE on RoPE layers (Llama 4);
      `norm_eps` is the epsilon of these and of MLA's latent norms.
    - `nope_temperature_scale`, `nope_temperature_floor`: on layers without RoPE, queries at
      position p are scaled by 1 + scale * log(1 + floor((p + 1) / floor)) (Llama 4; None = off).
    - `clip_qkv`: clamp q, k, v to [-c, c] (OLMoE, DBRX); `fused_qkv`: one [q|k|v] projection (DBRX).
    - `sinks`: a learned per-head logit that joins every softmax and is dropped after (GPT-OSS).
    - `scaling`: the softmax temperature; None is 1/sqrt(query head dim).
    - MLA fields (`kind="mla"`): low-rank query (`q_lora_rank`, None = full projection), latent
      key/value of `kv_lora_rank`, per-head dims split into a rotary and a non-rotary part.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    kind: str = "gqa"
    qkv_bias: bool = False
    out_bias: bool = False
    fused_qkv: bool = False
    qk_norm: str = "none"
    norm_eps: float = 1e-6
    clip_qkv: float | None = None
    sinks: bool = False
    scaling: float | None = None
    implementation: str = "sdpa"
    nope_temperature_scale: float | None = None
    nope_temperature_floor: float = 8192.0
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        require_choice("attention.kind", self.kind, ATTENTION_KINDS)
        require_choice("attention.qk_norm", self.qk_norm, QK_NORMS)
        require_choice("attention.implementation", self.implementation, IMPLEMENTATIONS)
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            require_int(f"attention.{name}", getattr(self, name), minimum=1)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "attention.num_kv_heads",
                f"got {self.num_kv_heads}, expected a divisor of num_heads={self.num_heads}",
            )
        if self.sinks and self.implementation != "eager":
            raise ConfigError("attention.implementation", "attention sinks need the eager implementation")
        if self.kind == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                require_int(f"attention.{name}", getattr(self, name), minimum=1)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.kind == "mla" else self.head_dim

    @property
    def softmax_scale(self) -> float:
        return self.scaling if self.scaling is not None else self.qk_head_dim**-0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RMSNorm(nn.Module):
    """HF's RMSNorm, operation for operation: normalise in fp32, cast back, then scale
    (`upcast_weight`: scale in fp32, then cast, as GPT-OSS does)."""

    def __init__(self, size: int, eps: float, upcast_weight: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.normalized_shape = (size,)
        self.eps = eps
        self.upcast_weight = upcast_weight

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same arithmetic in one op (bit for bit: tests/test_decode_fast_paths.py), which a
            # decode step, a chain of small ops, feels: 17 against 30 us per call on one core; on
            # moekit's kernels of torch's arithmetic (a step's few rows, training's many), where
            # they were found bit for bit equal
            return rms_norm_kernel.normalize(x, self.weight, self.eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.upcast_weight:
            return (self.weight * h).to(dtype)
        return self.weight * h.to(dtype)


@dataclass(frozen=True)
class MaskInputs:
    """What the masks of one forward depend on: padding [B, S] (True = real token) and the document
    of each token of a packed row [B, S] (None: one document per row)."""

    batch: int
    seq_len: int
    padding: Tensor | None
    documents: Tensor | None
    device: torch.device


def build_mask(inputs: MaskInputs, window: int | None, chunk: int | None, materialise: bool) -> Tensor | None:
    """Boolean [B, 1, S, S] mask (True = attend), or None when SDPA's `is_causal` is the same
    pattern, under the conditions transformers uses to skip it. `window`: attend to the last
    `window` positions; `chunk`: attend within chunks of `chunk` positions counted from each row's
    first real token (Llama 4)."""
    s = inputs.seq_len
    plain = inputs.padding is None or bool(inputs.padding.all())
    span = window if chunk is None else chunk
    if not materialise and plain and inputs.documents is None and (span is None or s < span):
        return None
    idx = torch.arange(s, device=inputs.device)
    mask = (idx[None, :] <= idx[:, None]).expand(inputs.batch, s, s)
    if window is not None:
        mask = mask & (idx[None, :] > idx[:, None] - window)
    if chunk is not None:
        left = torch.zeros(inputs.batch, 1, dtype=torch.long, device=inputs.device)
        if inputs.padding is not None:
            left = (inputs.padding.long().cumsum(-1) == 0).sum(-1, keepdim=True)
        position = idx[None, :] - left  # [B, S]
        mask = mask & ((position[:, None, :] // chunk) == (position[:, :, None] // chunk))
    if inputs.documents is not None:
        mask = mask & (inputs.documents[:, :, None] == inputs.documents[:, None, :])
    if inputs.padding is not None:
        mask = mask & inputs.padding[:, None, :]
    return mask.unsqueeze(1)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None].expand(b, kv, groups, s, d).reshape(b, kv * groups, s, d)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scale: float,
    implementation: str,
    sinks: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v for [B, H, S, D] queries and [B, KV, S, D] keys/values;
    returns [B, S, H, Dv]. Mirrors transformers' sdpa and eager attention functions. (The
    attention each token receives, for token importance, is `attention_received` of the same
    arguments.)"""
    groups = q.shape[1] // k.shape[1]
    if implementation == "sdpa":
        gqa = groups > 1 and mask is None and k.shape[-1] == v.shape[-1] <= 256
        if groups > 1 and not gqa:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, is_causal=mask is None and q.shape[2] > 1, enable_gqa=gqa
        )
        return out.transpose(1, 2).contiguous()
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        additive = torch.zeros((), dtype=scores.dtype, device=scores.device)
        scores = scores + torch.where(mask, additive, torch.finfo(scores.dtype).min)
    if sinks is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        combined = torch.cat([scores, sink], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1].to(v.dtype)
    return torch.matmul(probs, v).transpose(1, 2).contiguous()


def l2_norm(x: Tensor, eps: float) -> Tensor:
    """Llama 4's weightless QK norm: x / rms(x), computed in fp32."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def nope_temperature(
    seq_len: int, scale: float, floor: float, device: torch.device, start: int = 0
) -> Tensor:
    """Per-position query scale of Llama 4's layers without RoPE ([S, 1], fp32), for the slots
    start..start+S-1."""
    positions = torch.arange(start, start + seq_len, device=device).float()
    return (torch.log1p(torch.floor((positions + 1.0) / floor)) * scale + 1.0).unsqueeze(-1)


class Attention(nn.Module):
    """Grouped-query attention with the per-family options of `AttentionConfig`; `use_rope=False`
    makes a NoPE layer (Llama 4)."""

    def __init__(self, hidden: int, config: AttentionConfig, rope_layout: str, use_rope: bool = True):
        super().__init__()
        self.config = config
        self.rope_layout = rope_layout
        self.use_rope = use_rope
        h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
        if config.fused_qkv:
            self.qkv_proj = RowsLinear(hidden, (h + 2 * kv) * d, bias=config.qkv_bias)
        else:
            self.q_proj = RowsLinear(hidden, h * d, bias=config.qkv_bias)
            self.k_proj = RowsLinear(hidden, kv * d, bias=config.qkv_bias)
            self.v_proj = RowsLinear(hidden, kv * d, bias=config.qkv_bias)
        self.o_proj = RowsLinear(h * d, hidden, bias=config.out_bias)
        if config.qk_norm == "per_head":
            self.q_norm = RMSNorm(d, config.norm_eps)
            self.k_norm = RMSNorm(d, config.norm_eps)
        elif config.qk_norm == "whole":
            self.q_norm = RMSNorm(h * d, config.norm_eps)
            self.k_norm = RMSNorm(kv * d, config.norm_eps)
        self.sinks = nn.Parameter(torch.zeros(h)) if config.sinks else None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: LayerCache | None = None,
        want_received: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """`cache`: this layer's `LayerCache` in incremental decoding (`mask` then spans its keys);
        `want_received`: also return the mean attention each token received ([B, S])."""
        cfg = self.config
        b, s, _ = x.shape
        joint = self._joint_projection(x) if s == 1 else None
        if joint is None:
            q, k, v = self._project(x, cos, sin, cache)
            if cache is not None:
                k, v = cache.update(k, v)
        else:  # a decoding step: one product, then one norm and one rotation for q and k
            weight, bias, norm = joint
            qkv = self._joint_qkv(x, weight, bias)
            stepped = None
            if cache is not None and cache.window is None and self.rope_layout == "half":
                stepped = self._cached_step(qkv, cos, sin, cache, norm)
            if stepped is not None:
                q, k, v = stepped
            else:
                q, k, v = self._joint_step(qkv, cos, sin, norm)
                if cache is not None:
                    k, v = cache.update(k, v)
        out = self.o_proj(
            attend(q, k, v, mask, cfg.softmax_scale, cfg.implementation, self.sinks).reshape(b, s, -1)
        )
        if want_received:
            return out, attention_received(q, k, cfg.softmax_scale, mask, self.sinks)
        return out

    def _project(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, S, D], k and v [B, KV, S, D]: projected, clipped, normed and rotated."""
        cfg = self.config
        b, s, _ = x.shape
        if cfg.fused_qkv:
            kv_width = cfg.num_kv_heads * cfg.head_dim
            qkv = self._clip(self.qkv_proj(x))
            q, k, v = qkv.split([cfg.num_heads * cfg.head_dim, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            if cfg.qk_norm == "whole":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = self._clip(q), self._clip(k), self._clip(v)
        if s == 1:  # [B, 1, H * D] is [B, H, 1, D] as it lies: one view, no transpose (decode)
            shape = (b, -1, 1, cfg.head_dim)
            q, k, v = q.view(shape), k.view(shape), v.view(shape)
            if cfg.qk_norm == "per_head":
                q, k = self.q_norm(q), self.k_norm(k)
        else:
            shape = (b, s, -1, cfg.head_dim)
            q, k, v = q.view(shape), k.view(shape), v.view(shape)
            if cfg.qk_norm == "per_head":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin, self.rope_layout), apply_rope(k, cos, sin, self.rope_layout)
            if cfg.qk_norm == "l2":
                q, k = l2_norm(q, cfg.norm_eps), l2_norm(k, cfg.norm_eps)
        elif cfg.nope_temperature_scale is not None:
            start = 0 if cache is None else cache.length
            scale = nope_temperature(
                s, cfg.nope_temperature_scale, cfg.nope_temperature_floor, x.device, start
            )
            q = (q * scale).to(q.dtype)
        return q, k, v

    def _clip(self, t: Tensor) -> Tensor:
        c = self.config.clip_qkv
        return t if c is None else t.clamp(min=-c, max=c)

    def _joint_projection(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
        """[W_q; W_k; W_v], its bias and the per-head norm weights of [q | k] ([H + KV, 1, D]), for
        a one-token step outside autograd, or None where the step keeps the separate products.

        A decoding step of a small model is a chain of ops of a few microseconds each; joined, the
        three projections are one product, the queries' and keys' norms one norm and their
        rotations one. Joined only where the values stay those of the separate products: rows at
        the alignment they have in their own matrices (whole 64-byte lines: the products then
        measured bit for bit equal, tests/test_decode_fast_paths.py), no clipping, no norm over the
        whole projection, RoPE on. Small weights (a product reading less than a thread hand-off
        pays for, `dispatch.workers`) are copied joined, which costs little memory where the
        step's time is its ops', not its weight reads; large ones stay where they are and one call
        of the row kernel reads all three (`rows_linear.linear_parts`: the values of its separate
        calls), or, where that kernel does not run, the separate products do. Rebuilt when a
        weight changes (its version counter or storage)."""
        if not self._joinable:
            return None
        modules = self._modules  # (read directly: a decoding step is a chain of small ops)
        projections = [modules["q_proj"], modules["k_proj"], modules["v_proj"]]
        weights = [m.weight for m in projections]
        norms = (
            [modules["q_norm"].weight, modules["k_norm"].weight] if self.config.qk_norm == "per_head" else []
        )
        fp32 = x.dtype == torch.float32 and all(w.dtype == x.dtype for w in (*weights, *norms))
        if not fp32 or (x.shape[-1] * 4) % 64 or autocast_dtype(x) is not None:
            return None
        biases = [m.bias for m in projections]
        if len({b is None for b in biases}) > 1:  # a bias on some of the three: not joined
            return None
        sources = [t for t in (*weights, *biases, *norms) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *sources)):
            return None
        key = tuple((t.data_ptr(), t._version) for t in sources)
        kept = self.__dict__.get("_joint")
        if kept is None or kept[0] != key:
            small = too_small_to_share(sum(w.numel() for w in weights) * x.element_size())
            kept = (key, _joined(self.config, weights if small else None, biases, norms))
            self.__dict__["_joint"] = kept
        joint = kept[1]
        if joint[0] is None and not parts_fit(x, weights, biases):
            return None  # large weights without the row kernel: F.linear each, as the separate path
        return joint

    @property
    def _joinable(self) -> bool:
        """What `_joint_projection` needs of the configuration."""
        cfg = self.config
        return (
            not cfg.fused_qkv
            and cfg.clip_qkv is None
            and cfg.qk_norm in ("none", "per_head")
            and self.use_rope
        )

    def _joint_qkv(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """[q | k | v] of a one-token step through `_joint_projection`'s matrices."""
        if weight is None:  # large weights: one product over the three where they lie
            modules = self._modules
            projections = [modules["q_proj"], modules["k_proj"], modules["v_proj"]]
            return linear_parts(x, [m.weight for m in projections], [m.bias for m in projections])
        return F.linear(x, weight, bias)

    def _cached_step(
        self, qkv: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache, norm: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """`_joint_step` and the cache's update of a full-attention layer in one call: the per-head
        norms, rotations and cache append (`kernels.attention_step`, the same values); None where
        that kernel does not run."""
        if not attention_step.fits(qkv, cos, sin):
            return None
        return self.norm_rope_append(qkv, cos, sin, cache, norm)

    def norm_rope_append(
        self, qkv: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache, norm: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`_cached_step` where its kernel is known to run (`attention_step.fits`)."""
        cfg = self.config
        b, h, kv, d = qkv.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        heads = qkv.view(b, h + 2 * kv, 1, d)
        keys_buffer, values_buffer, slot = cache.room(heads[:, h : h + kv], heads[:, h + kv :])
        q = torch.ops.moekit.qk_norm_rope_append(
            qkv.view(b, -1), norm, cfg.norm_eps, cos, sin, keys_buffer, values_buffer, slot, h
        )
        k, v = cache.written(1)
        return q, k, v

    def _joint_step(
        self, qkv: Tensor, cos: Tensor, sin: Tensor, norm: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, 1, D], k and v [B, KV, 1, D] of a one-token step from `_joint_qkv`'s [q | k | v]:
        the values of the separate path (an RMSNorm's weight multiplies its normalised input last,
        as RMSNorm(x, None) * w does; the rotation is elementwise per head)."""
        cfg = self.config
        b, h, kv, d = qkv.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qk, v = qkv.view(b, h + 2 * kv, 1, d).split([h + kv, kv], dim=1)
        if norm is not None:
            fits = rms_norm_kernel.fits(qk, None)
            qk = (
                rms_norm_kernel.rms_norm(qk, None, cfg.norm_eps)
                if fits
                else torch.rms_norm(qk, (d,), None, cfg.norm_eps)
            )
            qk = qk * norm
        q, k = apply_rope(qk, cos, sin, self.rope_layout).split([h, kv], dim=1)
        return q, k, v


def _joined(
    config: AttentionConfig, weights: list[Tensor] | None, biases: list[Tensor | None], norms: list[Tensor]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """`Attention._joint_projection`'s matrices: [W_q; W_k; W_v] and their biases (all or none),
    or None for both where the weights are large (`weights` None: no copy; one call reads them
    where they lie, `rows_linear.linear_parts`); and the query and key norms' weights, one row
    per head."""
    with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable outside it too
        weight = None if weights is None else torch.cat(weights)
        bias = None if weights is None or biases[0] is None else torch.cat(biases)
        norm = None
        if norms:
            h, kv, d = config.num_heads, config.num_kv_heads, config.head_dim
            norm = torch.cat([norms[0].expand(h, d), norms[1].expand(kv, d)]).view(h + kv, 1, d)
    return weight, bias, norm


class LatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention as transformers implements it (the cache holds
    the expanded keys and values, as transformers' does)."""

    def __init__(self, hidden: int, config: AttentionConfig, rope_layout: str):
        super().__init__()
        self.config = config
        self.rope_layout = rope_layout
        h, qk = config.num_heads, config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=config.qkv_bias)
            self.q_a_norm = RMSNorm(config.q_lora_rank, config.norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj = nn.Linear(
            hidden, config.kv_lora_rank + config.qk_rope_head_dim, bias=config.qkv_bias
        )
        self.kv_a_norm = RMSNorm(config.kv_lora_rank, config.norm_eps)
        self.kv_b_proj = nn.Linear(
            config.kv_lora_rank, h * (config.qk_nope_head_dim + config.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(h * config.v_head_dim, hidden, bias=config.out_bias)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: LayerCache | None = None,
        want_received: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        cfg = self.config
        b, s, _ = x.shape
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(b, s, -1, cfg.qk_head_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        kv_latent, k_rot = torch.split(self.kv_a_proj(x), [cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        kv_latent = self.kv_a_norm(kv_latent).view(b, 1, s, cfg.kv_lora_rank)
        k_rot = k_rot.view(b, 1, s, cfg.qk_rope_head_dim)
        q_rot, k_rot = (
            apply_rope(q_rot, cos, sin, self.rope_layout),
            apply_rope(k_rot, cos, sin, self.rope_layout),
        )
        query = torch.cat((q_pass, q_rot), dim=-1)
        kv = self.kv_b_proj(kv_latent).view(b, s, -1, cfg.qk_nope_head_dim + cfg.v_head_dim).transpose(1, 2)
        k_nope, value = torch.split(kv, [cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        key = torch.cat((k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
        if cache is not None:
            key, value = cache.update(key, value)
        out = self.o_proj(
            attend(query, key, value, mask, cfg.softmax_scale, cfg.implementation).reshape(b, s, -1)
        )
        if want_received:
            return out, attention_received(query, key, cfg.softmax_scale, mask)
        return out


def build_attention(
    hidden: int, config: AttentionConfig, rope_layout: str, use_rope: bool = True
) -> nn.Module:
    if config.kind == "mla":
        return LatentAttention(hidden, config, rope_layout)
    return Attention(hidden, config, rope_layout, use_rope)
