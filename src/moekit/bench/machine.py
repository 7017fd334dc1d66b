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


def cpu_caches(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> dict[str, str]:
    """The first core's caches as the kernel reports them ({"L1d": "32K", "L2": "512K", ...}),
    {} where it does not: the kernels' blocking assumes at least 32 KB of L1 data and 256 KB of
    L2 per core, and the last level decides whether the experts' weights stay in cache."""
    caches = {}
    for index in sorted(root.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        caches[f"L{level}{suffix}"] = size
    return caches


def cpu_description() -> dict:
    """The CPU a benchmark ran on: model name and family/model/stepping (one name can cover
    several generations in a virtual machine), the vector features that decide which kernels run
    (AVX2, AVX-512F, AVX512_BF16, AMX), its caches, logical cores, torch's threads and its vector
    capability, so that figures from different machines are never compared as if they were one."""
    from moekit.kernels.store import cpu_model, cpu_signature

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
        signature=cpu_signature(),
        flags=dict(
            avx2="avx2" in flags,
            avx512f="avx512f" in flags,
            avx512_bf16="avx512_bf16" in flags,
            amx=any(f.startswith("amx") for f in flags),
        ),
        caches=cpu_caches(),
        cores=os.cpu_count(),
        usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
    )


def cpu_line(cpu: dict) -> str:
    """`cpu_description` in one line, for a benchmark's printed table."""
    name = ", ".join(part for part in (cpu["model"], cpu.get("signature")) if part)
    features = ", ".join(flag for flag, present in cpu["flags"].items() if present) or "no avx2/avx512/amx"
    caches = ", ".join(f"{level} {size}" for level, size in cpu.get("caches", {}).items() if level[-1] != "i")
    details = "; ".join(part for part in (features, caches) if part)
    return f"{name} ({details}; {cpu['cores']} cores, {cpu['torch_threads']} torch threads)"


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
