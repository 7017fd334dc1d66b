"""Whether decode's expert reads go faster split across the worker threads than on one core.

Decoding reads each chosen expert's weights for a row or two: the products are bound by memory
bandwidth, not arithmetic. Whether a second core adds bandwidth depends on the machine (one core
saturates the memory of some, not of others) and on what else runs on it (on a shared machine a
hand-off to a worker waits for that worker to be scheduled: measured on a loaded 2-core EPYC, the
native loops on the workers took a 1 GB Qwen3-MoE-shaped layer's batch-1 step from 4.0 ms on one
thread to 11 ms). So it is measured once per process and thread count, at first decode: the same
bytes read by one thread, and split in halves over the workers, in interleaved rounds, medians.
"""

from __future__ import annotations

import statistics
import time
from functools import cache

import torch

from moekit.dispatch.workers import run_shares, single_threaded

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
    """Whether reading memory split over `threads` workers (`workers.run_shares`) beats one
    thread, measured here (about 0.1-0.3 s, once per process and thread count)."""
    if threads < 2:
        return False
    data = torch.ones(TRIAL_BYTES // 4)
    parts = data.chunk(threads)
    single, split = [], []

    def read(part: torch.Tensor) -> None:
        part.sum()

    for _ in range(ROUNDS + 1):  # the first round warms the pool and the pages
        start = time.perf_counter()
        with single_threaded():
            for part in parts:
                read(part)
        single.append(time.perf_counter() - start)
        start = time.perf_counter()
        run_shares(parts, read)
        split.append(time.perf_counter() - start)
    return split_reads_pay_off(statistics.median(single[1:]), statistics.median(split[1:]))
