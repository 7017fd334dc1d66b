"""How quickly this machine wakes a waiting thread, recorded beside benchmark results.

A layer step hands work between threads many times (each of the experts' parallel passes),
so it slows down when the OS (or a VM's host) is slow to wake a thread, while large multi-threaded
GEMMs, on OpenMP threads that spin, do not. On the development VM the round trip below moves
between ~47 us and ~70 us over minutes, and the (since removed) expert worker paths lost 20-35 %
in the slow periods (BENCHMARKS.md): a run's figure tells which kind of period its timings come from.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def thread_round_trip_us(rounds: int = 1000) -> float:
    """Median time, in microseconds, for one thread to wake another and be woken back."""
    ping, pong = threading.Event(), threading.Event()

    def answer() -> None:
        for _ in range(rounds):
            ping.wait()
            ping.clear()
            pong.set()

    partner = threading.Thread(target=answer, daemon=True)
    partner.start()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        ping.set()
        pong.wait()
        pong.clear()
        times.append(time.perf_counter() - start)
    partner.join()
    return statistics.median(times) * 1e6


def cpu_description() -> dict:
    """The CPU a benchmark ran on: model, the vector features that decide which kernels run
    (AVX2, AVX-512F, AVX512_BF16, AMX), logical cores, torch's threads and its vector capability,
    so that figures from different machines are never compared as if they were one."""
    from moekit.kernels.store import cpu_model

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return dict(
        model=cpu_model(),
        flags=dict(
            avx2="avx2" in flags,
            avx512f="avx512f" in flags,
            avx512_bf16="avx512_bf16" in flags,
            amx=any(f.startswith("amx") for f in flags),
        ),
        cores=os.cpu_count(),
        usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
    )


# Bytes read per bandwidth trial: more than a last-level cache holds, so the trial reads memory.
BANDWIDTH_TRIAL_BYTES = 256 * 1024 * 1024


def memory_read_bandwidth(rounds: int = 5) -> float:
    """Bytes per second this process reads from memory: the better of one thread and all of
    torch's threads summing a buffer larger than the caches, median over `rounds` each. The limit
    a decode step's expert products cannot beat: they read each chosen expert's weights once."""
    data = torch.ones(BANDWIDTH_TRIAL_BYTES // 4)
    threads = torch.get_num_threads()
    best = 0.0
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        try:
            data.sum()  # warm the pages and the threads
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                data.sum()
                times.append(time.perf_counter() - start)
        finally:
            torch.set_num_threads(threads)
        best = max(best, BANDWIDTH_TRIAL_BYTES / statistics.median(times))
    return best


# The background load of `moekit bench layer --busy`: one core kept busy in pure Python; it exits
# by itself when its parent (the benchmark) is gone, so that a killed benchmark leaves nothing behind.
BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    sum(range(100000))\n"


@contextmanager
def busy_core() -> Iterator[int]:
    """Keep one core busy with a background process for the duration; yields its pid."""
    process = subprocess.Popen(
        [sys.executable, "-c", BUSY_LOOP],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
