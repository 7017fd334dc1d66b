"""An expert-cache simulator for offloading: hit rate against cache size under LRU, LFU, Belady.

When expert weights live in slow memory (CPU RAM behind a GPU, disk behind RAM), a cache holds m
experts of a layer and every routed token requests its experts in turn. The request stream of one
layer is its kept, compute-costing assignments in token order (dropped and null-expert
assignments need no weights). A miss loads the expert, evicting one if the cache is full:

- LRU: the least recently requested expert. Computed for every size in one pass from stack
  distances (Mattson et al. 1970): a request hits a cache of size m iff fewer than m distinct
  experts were requested since the last request of the same expert.
- LFU: the expert requested least often so far (ties: the least recently requested).
- Belady (MIN, Belady 1966): the expert whose next request is farthest in the future; the optimal
  demand-paging policy, an upper bound for any online policy.

`segment_cache_hit_rates` is the different oracle of Liang et al. 2025 (#52, SCH): a prefetching
cache that, before every token, holds the m experts most activated over the next L tokens.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
from torch import Tensor

POLICIES = ("lru", "lfu", "belady")


def request_stream(experts: Tensor, kept: Tensor, num_compute_experts: int) -> list[int]:
    """The flat expert-request sequence of one layer: kept compute assignments, token by token."""
    mask = kept & (experts >= 0) & (experts < num_compute_experts)
    return experts[mask].tolist()  # row-major: token order, then preference order within a token


def lru_hit_counts(requests: Sequence[int], max_size: int) -> list[int]:
    """Hits of an LRU cache of every size 1..max_size, from one pass over stack distances."""
    stack: list[int] = []  # most recent first
    at_distance = [0] * (max_size + 1)
    for item in requests:
        try:
            distance = stack.index(item)
        except ValueError:
            distance = -1
        if distance >= 0:
            del stack[distance]
            if distance < max_size:
                at_distance[distance] += 1
        stack.insert(0, item)
    hits, total = [], 0
    for size in range(1, max_size + 1):
        total += at_distance[size - 1]
        hits.append(total)
    return hits


def simulate_cache(requests: Sequence[int], size: int, policy: str) -> int:
    """Hits of a demand-paged cache of `size` items under `policy` (one of POLICIES)."""
    if policy not in POLICIES:
        raise ValueError(f"policy: got {policy!r}, expected one of {', '.join(POLICIES)}")
    if size <= 0:
        return 0
    if policy == "lru":
        return _lru_hits(requests, size)
    if policy == "lfu":
        return _lfu_hits(requests, size)
    return _belady_hits(requests, size)


def _lru_hits(requests: Sequence[int], size: int) -> int:
    hits = 0
    cached: dict[int, None] = {}  # insertion order = recency order
    for item in requests:
        if item in cached:
            hits += 1
            del cached[item]
        elif len(cached) >= size:
            del cached[next(iter(cached))]
        cached[item] = None
    return hits


def _lfu_hits(requests: Sequence[int], size: int) -> int:
    hits = 0
    frequency: dict[int, int] = {}
    cached: dict[int, tuple[int, int]] = {}  # item -> its current (frequency, last use)
    heap: list[tuple[int, int, int]] = []  # (frequency, last use, item), stale entries skipped lazily
    for time, item in enumerate(requests):
        frequency[item] = frequency.get(item, 0) + 1
        if item in cached:
            hits += 1
        elif len(cached) >= size:
            while True:
                count, used, victim = heapq.heappop(heap)
                if cached.get(victim) == (count, used):
                    del cached[victim]
                    break
        cached[item] = (frequency[item], time)
        heapq.heappush(heap, (frequency[item], time, item))
    return hits


def _belady_hits(requests: Sequence[int], size: int) -> int:
    never = len(requests)
    next_use = [never] * len(requests)
    upcoming: dict[int, int] = {}
    for i in range(len(requests) - 1, -1, -1):
        next_use[i] = upcoming.get(requests[i], never)
        upcoming[requests[i]] = i
    hits = 0
    cached: dict[int, int] = {}  # item -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, item), stale entries skipped lazily
    for i, item in enumerate(requests):
        if item in cached:
            hits += 1
        elif len(cached) >= size:
            while True:
                negative_next, victim = heapq.heappop(heap)
                if cached.get(victim) == -negative_next:
                    del cached[victim]
                    break
        cached[item] = next_use[i]
        heapq.heappush(heap, (-next_use[i], item))
    return hits


def hit_rate_curves(
    requests: Sequence[int], sizes: Sequence[int], policies: Sequence[str] = POLICIES
) -> dict[str, list[float]]:
    """Hit rate (hits / requests) for each policy at each cache size; NaN without requests."""
    n = len(requests)
    curves: dict[str, list[float]] = {}
    for policy in policies:
        if n == 0:
            curves[policy] = [float("nan")] * len(sizes)
            continue
        if policy == "lru":
            all_sizes = lru_hit_counts(requests, max(sizes, default=0))
            hits = [all_sizes[s - 1] if s > 0 else 0 for s in sizes]
        else:
            hits = [simulate_cache(requests, s, policy) for s in sizes]
        curves[policy] = [h / n for h in hits]
    return curves


def segment_cache_hit_rates(active: Tensor, runs: Tensor, window: int) -> list[float]:
    """SCH (Liang et al. 2025, §3.2; moe-lrc src/41_sch_calc.py) for every cache size m = 1..E.

    Before each token i of a run, an oracle cache holds the m experts with the most activations
    among tokens [i, i + window) of the same run (ties: the most recently used, then the lower id);
    an activation at token i hits iff its expert is in that set. `active` bool [N, E] (a token's
    kept compute experts), `runs` [N] labels contiguous blocks of consecutive tokens. Unlike the
    reference code, an expert's first activation is not charged specially: the oracle may prefetch
    it like any other. Returns the hit rate for m = 1..E (NaN without activations)."""
    return segment_cache_curves(active, runs, [window])[0]


def segment_cache_curves(active: Tensor, runs: Tensor, windows: Sequence[int]) -> list[list[float]]:
    """`segment_cache_hit_rates` for several window lengths, sharing the recency bookkeeping."""
    num_tokens, num_experts = active.shape
    total = int(active.sum())
    if total == 0:
        return [[float("nan")] * num_experts for _ in windows]
    index = torch.arange(num_tokens)
    first = torch.ones(num_tokens, dtype=torch.bool)
    first[1:] = runs[1:] != runs[:-1]
    last = torch.ones(num_tokens, dtype=torch.bool)
    last[:-1] = runs[:-1] != runs[1:]
    run_start = torch.cummax(torch.where(first, index, 0), dim=0).values
    run_end = torch.cummin(torch.where(last, index + 1, num_tokens).flip(0), dim=0).values.flip(0)
    cumulative = torch.zeros(num_tokens + 1, num_experts, dtype=torch.int64)
    torch.cumsum(active.to(torch.int64), dim=0, out=cumulative[1:])
    used_before = torch.cummax(torch.where(active, index[:, None], -1), dim=0).values
    used_before = torch.cat([torch.full((1, num_experts), -1), used_before[:-1]])
    recency = torch.where(used_before >= run_start[:, None], used_before + 1, 0)  # 0 = not used in the run
    ids = torch.arange(num_experts).expand(num_tokens, num_experts)
    curves = []
    for window in windows:
        future = cumulative[torch.minimum(index + window, run_end)] - cumulative[index]
        key = future * (num_tokens + 2) + recency
        order = torch.argsort(key, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, ids)
        at_rank = torch.bincount(rank[active], minlength=num_experts)
        curves.append([float(h) / total for h in torch.cumsum(at_rank, 0)])
    return curves
