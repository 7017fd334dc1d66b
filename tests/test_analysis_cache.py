"""The expert-cache simulator: known hit rates, Belady's optimality, SCH against its definition."""

from collections import OrderedDict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.analysis.cache import (
    POLICIES,
    hit_rate_curves,
    lru_hit_counts,
    request_stream,
    segment_cache_hit_rates,
    simulate_cache,
)
from moekit.analysis.metrics import multi_hot

streams = st.lists(st.integers(0, 5), min_size=0, max_size=60)


def optimal_hits(requests: list[int], size: int) -> int:
    """The best any demand-paged cache can do, by search over every eviction choice."""
    best: dict[frozenset, int] = {frozenset(): 0}
    for item in requests:
        step: dict[frozenset, int] = {}
        for cached, hits in best.items():
            if item in cached:
                options = [(cached, hits + 1)]
            elif len(cached) < size:
                options = [(cached | {item}, hits)]
            else:
                options = [((cached - {victim}) | {item}, hits) for victim in cached]
            for state, value in options:
                step[state] = max(step.get(state, -1), value)
        best = step
    return max(best.values())


def lru_by_hand(requests: list[int], size: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for item in requests:
        if item in cache:
            hits += 1
            cache.move_to_end(item)
        else:
            if len(cache) >= size:
                cache.popitem(last=False)
            cache[item] = None
    return hits


def test_cyclic_access_defeats_lru_below_the_cycle_length():
    cycle, repeats = 6, 10
    requests = list(range(cycle)) * repeats
    for size in range(1, cycle):
        assert simulate_cache(requests, size, "lru") == 0
    # from the cycle length on, only the first pass misses
    assert simulate_cache(requests, cycle, "lru") == cycle * (repeats - 1)
    curves = hit_rate_curves(requests, [1, 3, 5, 6, 7], ["lru"])
    assert curves["lru"] == [0.0, 0.0, 0.0, pytest.approx(0.9), pytest.approx(0.9)]
    # Belady keeps size - 1 items of the cycle resident and hits them every pass
    assert simulate_cache(requests, 4, "belady") > 0


@given(streams, st.integers(1, 6))
def test_lru_stack_distances_equal_a_direct_simulation(requests, size):
    assert lru_hit_counts(requests, 6)[size - 1] == lru_by_hand(requests, size)
    assert simulate_cache(requests, size, "lru") == lru_by_hand(requests, size)


@given(streams, st.integers(1, 6))
def test_belady_is_optimal_and_never_beaten(requests, size):
    belady = simulate_cache(requests, size, "belady")
    assert belady >= simulate_cache(requests, size, "lru")
    assert belady >= simulate_cache(requests, size, "lfu")
    if len(requests) <= 14:
        assert belady == optimal_hits(requests, size)


@given(streams)
def test_stack_policies_improve_with_size_and_only_miss_first_uses_when_everything_fits(requests):
    sizes = list(range(1, 8))
    curves = hit_rate_curves(requests, sizes)
    if not requests:
        assert all(v != v for curve in curves.values() for v in curve)  # NaN: no requests
        return
    for policy in ("lru", "belady"):  # stack algorithms: inclusion property
        assert curves[policy] == sorted(curves[policy])
    distinct = len(set(requests))
    for policy in POLICIES:
        assert curves[policy][-1] == pytest.approx((len(requests) - distinct) / len(requests))


def test_lfu_keeps_the_frequent_expert_that_lru_evicts():
    requests = [0, 0, 0, 1, 2, 0, 3, 0]  # a hot expert 0 between one-off experts
    assert simulate_cache(requests, 2, "lfu") == 4
    assert simulate_cache(requests, 2, "lru") == 3  # the two one-offs pushed 0 out
    scan = [0, 0, 0, 1, 2, 3, 0]  # a scan pushes 0 out of LRU but not out of LFU
    assert simulate_cache(scan, 2, "lfu") == 3
    assert simulate_cache(scan, 2, "lru") == 2
    with pytest.raises(ValueError, match="policy"):
        simulate_cache(scan, 2, "fifo")


def test_request_stream_skips_dropped_padded_and_null_experts():
    experts = torch.tensor([[2, 0], [1, -1], [3, 4]])
    kept = torch.tensor([[True, False], [True, False], [True, True]])
    assert request_stream(experts, kept, num_compute_experts=4) == [2, 1, 3]


def sch_by_definition(active: torch.Tensor, runs: torch.Tensor, window: int) -> list[float]:
    n, num_experts = active.shape
    at_size = [0] * num_experts
    total = 0
    for i in range(n):
        end = i
        while end < n and end < i + window and runs[end] == runs[i]:
            end += 1
        start = i
        while start > 0 and runs[start - 1] == runs[i]:
            start -= 1
        keys = []
        for e in range(num_experts):
            future = int(active[i:end, e].sum())
            used = [j for j in range(start, i) if active[j, e]]
            keys.append((-future, -(used[-1] + 1 if used else 0), e))
        ranking = [e for _, _, e in sorted(keys)]
        for e in range(num_experts):
            if active[i, e]:
                total += 1
                at_size[ranking.index(e)] += 1
    return [sum(at_size[: m + 1]) / total for m in range(num_experts)]


@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 2)), min_size=1, max_size=30),
    st.integers(1, 8),
)
def test_segment_cache_hit_rate_matches_its_definition(rows, window):
    experts = torch.tensor([[a, b if b != a else -1] for a, b, _ in rows])
    runs = torch.tensor(sorted(run for _, _, run in rows))
    active = multi_hot(experts, 5)
    assert segment_cache_hit_rates(active, runs, window) == pytest.approx(
        sch_by_definition(active, runs, window)
    )


def test_segment_cache_known_answers():
    runs = torch.arange(5).repeat_interleave(20)
    constant = torch.stack([runs % 6, (runs + 3) % 6], dim=1)  # two experts per run, fixed within it
    rates = segment_cache_hit_rates(multi_hot(constant, 6), runs, 16)
    assert rates[0] == pytest.approx(0.5)  # one of the token's two experts fits
    assert rates[1:] == [1.0] * 5
    generator = torch.Generator().manual_seed(0)
    random_top2 = torch.stack([torch.randperm(6, generator=generator)[:2] for _ in range(100)])
    # a window of one token: the oracle prefetches exactly the token's experts
    rates = segment_cache_hit_rates(multi_hot(random_top2, 6), runs, 1)
    assert rates[1:] == [1.0] * 5


def test_all_policies_on_every_size_from_a_long_random_stream_are_fast():
    generator = torch.Generator().manual_seed(0)
    requests = torch.randint(0, 16, (20_000,), generator=generator).tolist()
    curves = hit_rate_curves(requests, list(range(1, 17)))
    for policy in ("lru", "lfu"):
        assert all(x <= y for x, y in zip(curves[policy], curves["belady"], strict=True))
    # uniform random requests: LRU hit rate at size m is about m / E
    assert curves["lru"][7] == pytest.approx(0.5, abs=0.02)
