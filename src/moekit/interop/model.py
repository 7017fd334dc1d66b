"""The family model: one decoder that runs the HF MoE families moekit imports, with moekit's `MoE`
as the sparse FFN of each MoE layer.

Routing goes through the router presets (so every family shares the router path that
`tests/test_router_hf_parity.py` holds to transformers), the experts through moekit's grouped
dispatch, and attention, norms and embeddings through the variants of `interop.attention`, which
repeat transformers' arithmetic. What differs between families is data in `FamilyConfig`; the
parameter names on the HF side live in `interop.families`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, require_choice, require_int, require_known_fields, require_number
from moekit.inference.kv_cache import KVCache, LayerCache, step_mask
from moekit.interop.attention import AttentionConfig, MaskInputs, RMSNorm, build_attention, build_mask
from moekit.interop.rope import RopeConfig, half_signs, head_tables, inverse_frequencies, rope_tables
from moekit.kernels.rows_linear import RowsLinear
from moekit.layer import MoE, MoEConfig
from moekit.models.lm import DenseFFN
from moekit.routing.record import Routing

NORMS = ("rms", "layer")
HF_LAYOUTS = ("per_expert", "packed")


@dataclass(frozen=True)
class FamilyConfig:
    """A decoder of one HF family.

    - `moe_layers`, `windows`: per layer, whether the FFN is an MoE and its sliding attention
      window (None = full attention); dense layers use a SwiGLU FFN of `dense_ff_size`.
    - `chunks`, `rope_layers`: per layer, chunked attention's chunk size (None = none) and whether
      the layer uses RoPE (Llama 4); empty means none chunked, all with RoPE.
    - `norm`: RMSNorm or bias-free LayerNorm (DBRX); `norm_upcast_weight` scales in fp32 (GPT-OSS).
    - multipliers (Granite): embeddings are multiplied by `embedding_multiplier`, each block's output
      by `residual_multiplier`, and the logits divided by `logits_scaling`.
    - `isolate_documents`: position ids that restart inside a row start a new document that does
      not attend to the previous ones (transformers' packing); false where transformers ignores
      position ids when it builds masks (GPT-OSS), so that results stay identical.
    - `hf_layout`: the on-disk expert layout `to_hf` writes by default (the one it was read from).
    - `hf_config`: the source config.json fields, so that export keeps what moekit does not model
      (token ids, initializer range, aux-loss coefficient ...).
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    attention: AttentionConfig
    rope: RopeConfig
    moe: MoEConfig
    moe_layers: tuple[bool, ...]
    windows: tuple[int | None, ...]
    dense_ff_size: int = 0
    norm: str = "rms"
    norm_eps: float = 1e-6
    norm_upcast_weight: bool = False
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    tie_embeddings: bool = False
    isolate_documents: bool = True
    chunks: tuple[int | None, ...] = ()
    rope_layers: tuple[bool, ...] = ()
    hf_layout: str = "per_expert"
    hf_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers"):
            require_int(f"family.{name}", getattr(self, name), minimum=1)
        require_choice("family.norm", self.norm, NORMS)
        require_choice("family.hf_layout", self.hf_layout, HF_LAYOUTS)
        require_number("family.norm_eps", self.norm_eps, minimum=0.0, strict=True)
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            require_number(f"family.{name}", getattr(self, name))
        for name in ("moe_layers", "windows", "chunks", "rope_layers"):
            if name in ("chunks", "rope_layers") and not getattr(self, name):
                continue
            if len(getattr(self, name)) != self.num_layers:
                raise ConfigError(
                    f"family.{name}",
                    f"expected one entry per layer ({self.num_layers}), got {len(getattr(self, name))}",
                )
        if not all(self.moe_layers):
            require_int("family.dense_ff_size", self.dense_ff_size, minimum=1)
        if self.moe.hidden_size != self.hidden_size:
            raise ConfigError(
                "family.moe.hidden_size",
                f"got {self.moe.hidden_size}, expected hidden_size={self.hidden_size}",
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attention"] = self.attention.to_dict()
        data["rope"] = self.rope.to_dict()
        data["moe"] = self.moe.to_dict()
        data["moe_layers"] = list(self.moe_layers)
        for name in ("windows", "chunks", "rope_layers"):
            data[name] = list(getattr(self, name))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], field_prefix: str = "family") -> FamilyConfig:
        if not isinstance(data, dict):
            raise ConfigError(field_prefix, f"expected a mapping, got {type(data).__name__}")
        require_known_fields(field_prefix, data, (f.name for f in fields(cls)))
        values = dict(data)
        try:
            values["attention"] = AttentionConfig(**values["attention"])
            values["rope"] = RopeConfig(**values["rope"])
            values["moe"] = MoEConfig.from_dict(values["moe"], f"{field_prefix}.moe")
            values["moe_layers"] = tuple(values["moe_layers"])
            for name in ("windows", "chunks", "rope_layers"):
                values[name] = tuple(values.get(name, ()))
            return cls(**values)
        except KeyError as exc:
            raise ConfigError(f"{field_prefix}.{exc.args[0]}", "missing") from None
        except TypeError as exc:
            raise ConfigError(field_prefix, f"malformed ({exc})") from None


def _norm(config: FamilyConfig) -> nn.Module:
    if config.norm == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=False)
    return RMSNorm(config.hidden_size, config.norm_eps, config.norm_upcast_weight)


class DecoderLayer(nn.Module):
    def __init__(self, config: FamilyConfig, index: int):
        super().__init__()
        self.residual_multiplier = config.residual_multiplier
        self.window = config.windows[index]
        self.chunk = config.chunks[index] if config.chunks else None
        use_rope = config.rope_layers[index] if config.rope_layers else True
        self.attn_norm = _norm(config)
        self.attn = build_attention(config.hidden_size, config.attention, config.rope.layout, use_rope)
        self.ffn_norm = _norm(config)
        self.ffn: nn.Module = (
            MoE(config.moe)
            if config.moe_layers[index]
            else DenseFFN(config.hidden_size, config.dense_ff_size)
        )

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        token_mask: Tensor | None,
        previous: Routing | None,
        cache: LayerCache | None = None,
    ) -> tuple[Tensor, Routing | None]:
        ffn = self.ffn  # (looked up once: a decoding step is a chain of small ops)
        moe = isinstance(ffn, MoE)
        received = None
        if moe and x.shape[1] > 1 and ffn.wants_attention_received(x.shape[1]):
            a, received = self.attn(self.attn_norm(x), cos, sin, mask, cache, want_received=True)
        else:
            a = self.attn(self.attn_norm(x), cos, sin, mask, cache)
        x = x + self._scaled(a)
        h = self.ffn_norm(x)
        routing = None
        if moe:
            h, routing = ffn.forward_with_routing(
                h, token_mask, previous=previous, attention_received=received
            )
        else:
            h = ffn(h)
        return x + self._scaled(h), routing

    def _scaled(self, h: Tensor) -> Tensor:
        return h if self.residual_multiplier == 1.0 else h * self.residual_multiplier


@dataclass
class FamilyOutput:
    logits: Tensor  # [B, S, V]
    routings: list[Routing]  # one per MoE layer, in layer order


class FamilyModel(nn.Module):
    """`model(input_ids, attention_mask=None, position_ids=None).logits` as the HF model computes
    them. Padding (attention_mask == 0) is attended by nobody and routed to no expert; position ids
    that restart inside a row mark packed documents that do not attend to each other."""

    def __init__(self, config: FamilyConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = _norm(config)
        self.head = RowsLinear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    @property
    def moe_layers(self) -> list[MoE]:
        return [layer.ffn for layer in self.layers if layer.is_moe]

    def _rope_frequencies(self, device: torch.device) -> tuple[Tensor, float, Tensor]:
        """RoPE's inverse frequencies (fp32), scaling and `half_signs`, computed once per device
        rather than at every decoding step (kept off the state dict and out of `model.to(dtype)`)."""
        cached = self.__dict__.get("_rope_cache")
        if cached is None or cached[0].device != device:
            with torch.inference_mode(False):  # normal tensors, usable later in training too
                inv_freq, scaling = inverse_frequencies(self.config.rope)
                cached = (inv_freq.to(device), scaling, half_signs(2 * inv_freq.numel(), device))
            self.__dict__["_rope_cache"] = cached
        return cached

    def position_tables(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """RoPE's cos and sin tables for `position_ids` [B, S], as every layer's attention takes
        them (`head_tables`)."""
        inv_freq, scaling, signs = self._rope_frequencies(position_ids.device)
        cos, sin = rope_tables(self.config.rope, position_ids, dtype, (inv_freq, scaling))
        return head_tables(cos, sin, self.config.rope.layout, signs)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache for this model (sliding-window layers keep only their window);
        `capacity`: the positions it will hold, if known (its buffers are then allocated once)."""
        return KVCache([layer.window for layer in self.layers], capacity)

    @property
    def context_length(self) -> int:
        """The longest sequence the model was configured for (its position embeddings)."""
        return self.config.rope.max_position_embeddings

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> FamilyOutput:
        """With a `cache` (incremental decoding, `new_cache()`), `input_ids` are the step's new
        tokens, `attention_mask` their padding and `position_ids` their positions (default: the
        slots that follow the cached ones)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [batch, seq], got {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        device = input_ids.device
        padding = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask: expected shape {tuple(input_ids.shape)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            padding = attention_mask.to(torch.bool)
        documents = None
        start = 0
        if cache is not None:
            start = cache.begin((b, s) if padding is None else padding, device)
        if position_ids is None:
            position_ids = torch.arange(start, start + s, device=device).unsqueeze(0)
        elif attention_mask is None and cache is None and self.config.isolate_documents:
            documents = packed_documents(position_ids.expand(b, s))
        x = self.embed(input_ids)
        if self.config.embedding_multiplier != 1.0:
            x = x * self.config.embedding_multiplier
        cos, sin = self.position_tables(position_ids, x.dtype)
        inputs = MaskInputs(b, s, padding, documents, device)
        materialise = self.config.attention.implementation == "eager"
        masks: dict[tuple[int | None, int | None], Tensor | None] = {}
        routings: list[Routing] = []
        for index, layer in enumerate(self.layers):
            span = (layer.window, layer.chunk)
            if span not in masks:
                if cache is None:
                    masks[span] = build_mask(inputs, layer.window, layer.chunk, materialise)
                else:
                    masks[span] = step_mask(cache, start, layer.window, layer.chunk, materialise)
            previous = routings[-1] if routings else None
            layer_cache = None if cache is None else cache.layers[index]
            x, routing = layer(x, cos, sin, masks[span], padding, previous, layer_cache)
            if routing is not None:
                routings.append(routing)
        logits = self.head(self.norm(x))
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        return FamilyOutput(logits, routings)


def packed_documents(position_ids: Tensor) -> Tensor | None:
    """Document index of each token of rows that pack several sequences, found where the position
    ids do not advance by one (transformers' `find_packed_sequence_indices`); None if unpacked."""
    first = position_ids[:, :1] - 1
    documents = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    if bool((documents[:, -1] == 0).all()):
        return None
    return documents
