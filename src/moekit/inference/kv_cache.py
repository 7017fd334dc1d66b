"""The key/value cache of incremental decoding, and the attention masks of a cached step.

Every attention layer keeps its keys (after RoPE) and values, [B, KV heads, L, D]; a layer with a
sliding window keeps only the last `window - 1` positions, all a later query can see. Positions are
cache slots: batches are left-padded, so slot i is the i-th column of every row, and the cache keeps
which slots are padding. DeepSeek's latent attention caches its expanded keys and values, as
transformers does.

Full-attention layers write each step into a buffer allocated once for the whole generation
(`capacity`, the prompt plus the new tokens; grown by doubling when unknown), so a decode step
copies only its own keys instead of concatenating the whole cache again; the step attends over a
view of the buffer. Whether any slot is padding is kept as a Python flag, so a step over real
tokens needs no look at the tensor (no host synchronisation) to choose its mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor

from moekit.kernels import native


def _grown(buffer: Tensor | None, like: Tensor, dim: int, needed: int, capacity: int | None) -> Tensor:
    """A buffer shaped as `like` with at least `needed` slots along `dim`, holding `buffer`'s."""
    size = max(needed, capacity or 0, 2 * (0 if buffer is None else buffer.shape[dim]))
    shape = list(like.shape)
    shape[dim] = size
    out = like.new_empty(shape)
    if buffer is not None:
        out.narrow(dim, 0, buffer.shape[dim]).copy_(buffer)
    return out


def appends_in_one_call(keys: Tensor, values: Tensor, buffer: Tensor) -> bool:
    """Whether a step's keys and values go into the buffers in one call of moekit's kernel
    (`csrc/kv_append.cpp`; the same bytes as the two copies): a decoding step's few CPU rows
    outside autograd, where moekit's C++ ops are built."""
    if keys.device.type != "cpu" or keys.shape[2] > 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        return False
    if keys.dtype != buffer.dtype or values.dtype != buffer.dtype or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad or buffer.requires_grad):
        return False
    return kernel_built()


@cache
def kernel_built() -> bool:
    """Whether moekit's C++ ops run in this process (decided at the first use, as theirs is)."""
    return native.loops_available() and hasattr(torch.ops.moekit, "kv_append_")


class LayerCache:
    """One attention layer's keys and values; `length` counts the slots it has seen."""

    def __init__(self, window: int | None = None, capacity: int | None = None):
        self.window = window
        self.capacity = capacity
        self._keys: Tensor | None = None  # [B, KV, slots, D]: the kept keys, then room
        self._values: Tensor | None = None
        self._kept = 0  # slots of the buffers in use
        self.length = 0

    @property
    def keys(self) -> Tensor | None:
        return None if self._keys is None else self._keys[:, :, : self._kept]

    @property
    def values(self) -> Tensor | None:
        return None if self._values is None else self._values[:, :, : self._kept]

    def update(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's [B, KV, S, D] keys and values; returns every key and value the step's
        queries attend over (the kept ones followed by the new ones)."""
        steps = int(keys.shape[2])
        if self.window is not None:  # bounded by the window: the new keys join the kept ones
            self.length += steps
            if self._keys is not None:
                keys = torch.cat([self.keys, keys], dim=2)
                values = torch.cat([self.values, values], dim=2)
            keep = min(int(keys.shape[2]), self.window - 1)
            first = int(keys.shape[2]) - keep
            self._keys, self._values = keys[:, :, first:], values[:, :, first:]
            self._kept = keep
            return keys, values
        keys_buffer, values_buffer, slot = self.room(keys, values)
        if appends_in_one_call(keys, values, keys_buffer):
            torch.ops.moekit.kv_append_(keys_buffer, values_buffer, keys, values, slot)
        else:
            keys_buffer[:, :, slot : slot + steps].copy_(keys)
            values_buffer[:, :, slot : slot + steps].copy_(values)
        return self.written(steps)

    def room(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, int]:
        """(keys buffer, values buffer, first free slot) with room for a step's [B, KV, S, D] keys
        and values in a full-attention layer (grown where needed), for a caller that writes them
        there itself; `written(S)` then counts them in and returns what the step attends over."""
        end = self._kept + int(keys.shape[2])
        if (
            self._keys is None
            or end > self._keys.shape[2]
            or self._keys.shape[:2] != keys.shape[:2]
            or self._keys.shape[3] != keys.shape[3]
            or self._keys.dtype != keys.dtype
        ):
            self._keys = _grown(self.keys, keys, 2, end, self.capacity)
            self._values = _grown(self.values, values, 2, end, self.capacity)
        return self._keys, self._values, self._kept

    def written(self, steps: int) -> tuple[Tensor, Tensor]:
        """Count in the `steps` slots written after `room`; every key and value kept (the new ones
        last), as `update` returns them."""
        self._kept += steps
        self.length += steps
        return self._keys.narrow(2, 0, self._kept), self._values.narrow(2, 0, self._kept)

    def first_key_slot(self, start: int) -> int:
        """The slot of the first key a step beginning at slot `start` attends over."""
        return 0 if self.window is None else max(0, start - (self.window - 1))

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values kept (not of the room allocated for later steps)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)


class KVCache:
    """The cache of a whole model: one `LayerCache` per attention layer (windows per layer, None =
    full attention) and the padding of every slot so far ([B, length] bool, True = real token).
    `capacity`: the slots the generation will fill, if known (buffers are allocated once)."""

    def __init__(self, windows: Sequence[int | None], capacity: int | None = None):
        self.layers = [LayerCache(w, capacity) for w in windows]
        self.capacity = capacity
        self.all_real = True  # no slot so far is padding
        self._padding: Tensor | None = None  # [B, slots] once a slot is padding; else not kept
        self._batch = 0
        self._device: torch.device | None = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def begin(self, padding: Tensor | tuple[int, int], device: torch.device | None = None) -> int:
        """Start a step over new tokens with `padding` [B, S] (True = real token), or (B, S) for a
        step of real tokens only (on `device`); returns its first slot."""
        start = self.length
        if isinstance(padding, Tensor):
            batch, steps = int(padding.shape[0]), int(padding.shape[1])
            real = self.all_real and bool(padding.all())
            self._device = padding.device
        else:
            (batch, steps), real = padding, True
            self._device = device if device is not None else self._device
        self._batch = batch
        self.length += steps
        if self.all_real and real:
            return start
        if self._padding is None or self.length > self._padding.shape[1]:
            held = 0 if self._padding is None else self._padding.shape[1]
            size = max(self.length, self.capacity or 0, 2 * held)
            grown = torch.ones(batch, size, dtype=torch.bool, device=self._device)
            if self._padding is not None:
                grown[:, :start] = self._padding[:, :start]
            self._padding = grown
        if isinstance(padding, Tensor):
            self._padding[:, start : self.length].copy_(padding)
        else:
            self._padding[:, start : self.length] = True
        self.all_real = False
        return start

    @property
    def padding(self) -> Tensor | None:
        """Which slots hold real tokens, [B, length] (None before the first step)."""
        if self.length == 0:
            return None
        if self._padding is None:
            return torch.ones(self._batch, self.length, dtype=torch.bool, device=self._device)
        return self._padding[:, : self.length]

    @property
    def left_padding(self) -> Tensor:
        """Padding slots before each row's first real token, [B, 1]."""
        padding = self.padding
        assert padding is not None
        return (padding.long().cumsum(-1) == 0).sum(-1, keepdim=True)

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
    end = cache.length
    first_key = 0 if window is None else max(0, start - (window - 1))
    steps = end - start
    plain = cache.all_real and chunk is None
    if not materialise and plain and (steps == 1 or (start == 0 and (window is None or steps <= window))):
        return None
    padding = cache.padding
    assert padding is not None
    if steps == 1 and chunk is None:
        # one query at the newest slot: every key kept is causal and inside the window
        return padding[:, None, None, first_key:end]
    device = padding.device
    query = torch.arange(start, end, device=device)
    key = torch.arange(first_key, end, device=device)
    mask = key[None, :] <= query[:, None]
    if window is not None:
        mask = mask & (key[None, :] > query[:, None] - window)
    mask = mask.expand(padding.shape[0], steps, end - first_key)
    if chunk is not None:
        left = cache.left_padding
        mask = mask & (
            ((query[None, :] - left) // chunk)[:, :, None] == ((key[None, :] - left) // chunk)[:, None, :]
        )
    mask = mask & padding[:, None, first_key:end]
    return mask.unsqueeze(1)
