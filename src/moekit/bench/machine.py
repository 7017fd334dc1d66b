"""How quickly this machine wakes a waiting thread, recorded beside benchmark results.

moekit's expert workers hand work and the interpreter lock between threads many times per step,
so they slow down when the OS (or a VM's host) is slow to wake a thread, while large multi-threaded
GEMMs, on OpenMP threads that spin, do not. On the development VM the round trip below moves
between ~47 us and ~70 us over minutes, and the worker paths lose 20-35 % in the slow periods
(BENCHMARKS.md): a run's figure tells which kind of period its timings come from.
"""

from __future__ import annotations

import statistics
import threading
import time


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
