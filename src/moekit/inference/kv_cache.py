"""The key/value cache of incremental decoding, and the attention masks of a cached step.

Every attention layer keeps its keys (after RoPE) and values, [B, KV heads, L, D]; a layer with a
sliding window keeps only the last `window - 1` positions, all a later query can see. Positions are
cache slots: batches are left-padded, so slot i is the i-th column of every row, and the cache keeps
which slots are padding. DeepSeek's latent attention caches its expanded keys and values, as
transformers does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class LayerCache:
    """One attention layer's keys and values; `length` counts the slots it has seen."""

    def __init__(self, window: int | None = None):
        self.window = window
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.length = 0

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's [B, KV, S, D] keys and values; returns every key and value the step's
        queries attend over (the kept ones followed by the new ones)."""
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)
            values = torch.cat([self.values, values], dim=2)
        self.length += int(keys.shape[2]) - (0 if self.keys is None else int(self.keys.shape[2]))
        if self.window is not None and keys.shape[2] > self.window - 1:
            self.keys, self.values = keys[:, :, -(self.window - 1) :], values[:, :, -(self.window - 1) :]
        else:
            self.keys, self.values = keys, values
        return keys, values

    def first_key_slot(self, start: int) -> int:
        """The slot of the first key a step beginning at slot `start` attends over."""
        return 0 if self.window is None else max(0, start - (self.window - 1))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)


class KVCache:
    """The cache of a whole model: one `LayerCache` per attention layer (windows per layer, None =
    full attention) and the padding of every slot so far ([B, length] bool, True = real token)."""

    def __init__(self, windows: Sequence[int | None]):
        self.layers = [LayerCache(w) for w in windows]
        self.padding: Tensor | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def begin(self, padding: Tensor) -> int:
        """Start a step over new tokens with `padding` [B, S]; returns its first slot."""
        start = self.length
        self.padding = padding if self.padding is None else torch.cat([self.padding, padding], dim=1)
        self.length += int(padding.shape[1])
        return start

    @property
    def left_padding(self) -> Tensor:
        """Padding slots before each row's first real token, [B, 1]."""
        assert self.padding is not None
        return (self.padding.long().cumsum(-1) == 0).sum(-1, keepdim=True)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


def step_mask(
    cache: KVCache, start: int, window: int | None, chunk: int | None, materialise: bool
) -> Tensor | None:
    """Boolean [B, 1, S, L] mask (True = attend) of the step over slots [start, cache.length)
    against the keys a layer with this `window` holds; None when attending to every key causally
    is the same (SDPA's fast path): no padding, no chunks, and a one-token step or the first one.

    Slots follow transformers' masks: causal, `window` = attend to the last `window` slots,
    `chunk` = attend within chunks counted from each row's first real token (Llama 4)."""
    assert cache.padding is not None
    end = cache.length
    first_key = 0 if window is None else max(0, start - (window - 1))
    steps = end - start
    plain = bool(cache.padding.all()) and chunk is None
    if not materialise and plain and (steps == 1 or (start == 0 and (window is None or steps <= window))):
        return None
    device = cache.padding.device
    query = torch.arange(start, end, device=device)
    key = torch.arange(first_key, end, device=device)
    mask = key[None, :] <= query[:, None]
    if window is not None:
        mask = mask & (key[None, :] > query[:, None] - window)
    mask = mask.expand(cache.padding.shape[0], steps, end - first_key)
    if chunk is not None:
        left = cache.left_padding
        mask = mask & (
            ((query[None, :] - left) // chunk)[:, :, None] == ((key[None, :] - left) // chunk)[:, None, :]
        )
    mask = mask & cache.padding[:, None, first_key:end]
    return mask.unsqueeze(1)
