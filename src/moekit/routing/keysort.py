"""Stable sorting of small non-negative integer keys (expert ids, token ids): the grouping step of
routing.

Every router groups its assignments by expert with a stable sort, once per layer and step, and
the native combine orders them by token (`dispatch/grouped.py`'s `by_token`). On the CPU, where
the caller knows a bound on the keys and moekit's kernels are built, a counting sort does it
(`csrc/counting_sort.cpp`): two passes over the keys, with each key's run bounds as a by-product.
Otherwise numpy sorts 16-bit integer keys with a radix sort: measured on the development machine,
44 us for 16,384 keys of 128 experts against 520 us for `torch.sort(stable=True)`, which is a
quarter of the router's forward at 2048 tokens. A stable sort's result is unique, so every path
gives the same order; torch's sort is kept for other devices, for keys that do not fit 16 bits, and
under `torch.compile` (the extension, numpy and the host read-back of the keys' range would break
the graph).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from moekit.kernels import native

# Keys up to this value go to numpy's radix sort (int16).
RADIX_KEY_LIMIT = 2**15 - 1
# Fewer keys than this go to torch's sort: the numpy path's fixed cost (two reads of the keys'
# range on the host, two conversions) outweighs its faster sort below a few thousand keys
# (measured: 22 us against 5 us for the 2-64 keys of a decode step, level near 2048 keys).
RADIX_MIN_KEYS = 1024


def stable_sort(keys: Tensor, num_keys: int | None = None) -> tuple[Tensor, Tensor]:
    """(sorted keys, order) of a 1-D tensor of non-negative integer keys, equal keys kept in their
    original order: `torch.sort(keys, stable=True)`, faster on the CPU. `num_keys`: a bound the
    caller knows (every key in [0, num_keys)), which lets the counting sort run."""
    if _counts(keys, num_keys, dim=1):
        sorted_keys, order, _ = torch.ops.moekit.stable_counting_sort(keys, num_keys)
        return sorted_keys, order
    small = keys.numel() < RADIX_MIN_KEYS or keys.numel() == 0
    if torch.compiler.is_compiling() or keys.device.type != "cpu" or small or keys.dim() != 1:
        return torch.sort(keys, stable=True)
    if int(keys.min()) < 0 or int(keys.max()) > RADIX_KEY_LIMIT:
        return torch.sort(keys, stable=True)
    order = torch.from_numpy(np.argsort(keys.numpy().astype(np.int16), kind="stable").astype(np.int64))
    return keys[order], order


def sort_cells(cells: Tensor, num_keys: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sorted keys, order, row, column) of the cells of a 2-D tensor [rows, width] (a router's
    [T, k] choices) by key: `stable_sort` of the flattened cells, and each sorted cell's row and
    column (order // width and order % width: torch's int64 division and remainder took 44 and
    57 us for 16,384 choices, which the counting sort places without dividing)."""
    if _counts(cells, num_keys, dim=2):
        return torch.ops.moekit.stable_counting_sort_cells(cells, num_keys)
    sorted_keys, order = stable_sort(cells.reshape(-1), num_keys)
    width = cells.shape[1]
    if cells.shape[0] == 1:  # one row: the order is its columns (fewer ops per decode step)
        return sorted_keys, order, torch.zeros_like(order), order
    return sorted_keys, order, torch.div(order, width, rounding_mode="floor"), order % width


def key_runs(keys: Tensor, num_keys: int) -> tuple[Tensor, Tensor]:
    """(order, bounds) of keys in [0, num_keys): the stable order (as `stable_sort`'s) and
    bounds [num_keys + 1], key j's positions being order[bounds[j]:bounds[j + 1]]."""
    if _counts(keys, num_keys, dim=1):
        _, order, bounds = torch.ops.moekit.stable_counting_sort(keys, num_keys)
        return order, bounds
    _, order = stable_sort(keys)
    bounds = keys.new_zeros(num_keys + 1)
    torch.cumsum(torch.bincount(keys, minlength=num_keys)[:num_keys], 0, out=bounds[1:])
    return order, bounds


def _counts(keys: Tensor, num_keys: int | None, dim: int) -> bool:
    """Whether the counting sort takes these keys: a bound given, `dim`-D int64 CPU keys outside
    `torch.compile`, and the kernels built."""
    return (
        num_keys is not None
        and keys.dim() == dim
        and keys.dtype == torch.int64
        and keys.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and native.loops_available()
    )
