"""Whether read-bound work (decode's expert products) goes faster on all threads than on one.

Decoding reads each chosen expert's weights for a row or two: the products are bound by memory
bandwidth, not arithmetic. Whether a second core adds bandwidth depends on the machine (one core
saturates the memory of some, not of others). So it is measured once per CPU model, thread count
and torch version, at first decode, and stored (`moekit.kernels.store`): the same bytes summed on
one thread and on all of torch's threads, in interleaved rounds, medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

# Bytes read per trial: a decode step's experts in one layer (tens of MB), and more than a
# last-level cache holds, so the trial reads memory as decode does.
TRIAL_BYTES = 64 * 1024 * 1024
ROUNDS = 5
# The split must be clearly faster: the trial reads in one hand-off what decode reads in several.
REQUIRED_GAIN = 1.2


def split_reads_pay_off(single_seconds: float, split_seconds: float) -> bool:
    """The decision from one measurement: the split reads at least REQUIRED_GAIN times faster."""
    return split_seconds * REQUIRED_GAIN <= single_seconds


@cache
def parallel_reads_pay_off(threads: int) -> bool:
    """Whether reading memory on `threads` threads beats one thread on this CPU model (measured
    once, about 0.1-0.3 s, and stored)."""
    if threads < 2:
        return False
    from moekit.kernels.store import stored_choice

    choice = stored_choice(f"split-reads-{threads}", ("one", "split"), lambda: _measure(threads))
    return choice == "split"


def decode_threads() -> int:
    """Threads for decode's expert products: all of torch's where split reads pay off, else one."""
    threads = torch.get_num_threads()
    return threads if parallel_reads_pay_off(threads) else 1


def _measure(threads: int) -> str:
    data = torch.ones(TRIAL_BYTES // 4)
    single, split = [], []
    for _ in range(ROUNDS + 1):  # the first round warms the threads and the pages
        with single_threaded():
            start = time.perf_counter()
            data.sum()
            single.append(time.perf_counter() - start)
        with torch_threads(threads):
            start = time.perf_counter()
            data.sum()
            split.append(time.perf_counter() - start)
    faster = split_reads_pay_off(statistics.median(single[1:]), statistics.median(split[1:]))
    return "split" if faster else "one"


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's ops on `count` threads for the duration."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded():
    """torch's ops on one thread for the duration: tiny products (decode) run faster unthreaded
    than with a hand-off between threads."""
    return torch_threads(1)
