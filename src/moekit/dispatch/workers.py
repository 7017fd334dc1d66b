"""Run per-expert GEMMs on several single-threaded workers instead of one multi-threaded GEMM each.

Measured on 2 cores: MKL splits a small expert GEMM (e.g. 128 x 256 x 256) across its threads
with enough synchronisation overhead that a loop over 128 experts reaches ~146 GFLOP/s, against
~210 for one large GEMM. Giving each core whole experts, one thread per GEMM, recovers most of it
(~180). The workers set their own OpenMP thread count to 1 (a per-thread setting), so the rest of
the process keeps its threads.

One condition: OpenMP's idle threads must not spin long after each parallel region, or they
compete with the workers for the cores (measured: the parallel path then runs slower than the
serial one). `moekit.runtime.tune_cpu_runtime` sets GOMP_SPINCOUNT before torch starts; without
a low spin count in the environment, `workers_enabled()` is false and the serial loop is used.

The pool is created on first use, one per process and thread count, and is never mutated after.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import TypeVar

import torch

T = TypeVar("T")
Slice = tuple[int, int, int]  # (expert, start row, end row)


def _torch_openmp() -> ctypes.CDLL | None:
    """torch's own libgomp (the library its kernels use), if this build uses GNU OpenMP."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if not os.path.exists(path):
        return None
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


# libgomp spins about this many iterations before sleeping by default (OMP_WAIT_POLICY unset).
MAX_SPIN_COUNT = 100_000


def workers_enabled() -> bool:
    """True if torch uses GNU OpenMP whose idle threads were told not to spin for long."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").lower()
    spin = os.environ.get("GOMP_SPINCOUNT", "")
    low_spin = policy == "passive" or (spin.isdigit() and int(spin) <= MAX_SPIN_COUNT)
    return low_spin and torch.get_num_threads() > 1 and openmp_library() is not None


@cache
def openmp_library() -> ctypes.CDLL | None:
    return _torch_openmp()


@cache
def worker_pool(num_workers: int) -> ThreadPoolExecutor | None:
    """`num_workers` helper threads whose torch ops run single-threaded; None if unsupported."""
    openmp = openmp_library()
    if openmp is None or num_workers < 1:
        return None

    def single_threaded() -> None:
        openmp.omp_set_num_threads(1)
        torch.set_grad_enabled(False)

    return ThreadPoolExecutor(num_workers, thread_name_prefix="moekit-expert", initializer=single_threaded)


def balanced_chunks(items: Sequence[tuple[int, int, int]], parts: int) -> list[list[tuple[int, int, int]]]:
    """Split expert slices (e, start, end), in order, into `parts` runs of about equal rows: each
    expert goes to the run its middle row falls in."""
    total = sum(t - s for _, s, t in items)
    chunks: list[list[tuple[int, int, int]]] = [[] for _ in range(parts)]
    done, index = 0, 0
    for item in items:
        rows = item[2] - item[1]
        while index < parts - 1 and done + rows / 2 >= total * (index + 1) / parts:
            index += 1
        chunks[index].append(item)
        done += rows
    return [c for c in chunks if c]


def for_each_expert(
    items: Sequence[tuple[int, int, int]], fn: Callable[[int, int, int], None], parallel: bool
) -> None:
    """Call fn(e, start, end) for every item; when `parallel`, the calling thread and threads-1
    helpers take the experts one at a time, largest first, each taking the next when it finishes
    its last, every GEMM single-threaded. Taking them as they come keeps the cores busy whatever
    the routing's expert sizes (a fixed split of 8 experts of ~500 rows left one core a third of
    the rows short) and whatever else runs on a core; each expert is still computed by one
    thread in one way, so the result does not depend on which thread took it."""
    if not _helpers_for(len(items), parallel):
        for item in items:
            fn(*item)
        return
    _take_largest_first(items, lambda item: item[2] - item[1], lambda item: fn(*item))


# Runs per thread for `for_each_run`: enough for the last ones to even out the threads' shares.
RUNS_PER_THREAD = 4


def for_each_run(items: Sequence[Slice], fn: Callable[[Sequence[Slice]], None], parallel: bool) -> None:
    """Call fn(run) on consecutive runs of the items that together cover them: all of them in one
    run unless `parallel`; else about RUNS_PER_THREAD runs of equal rows per thread, taken like
    `for_each_expert`'s experts, largest first. For loops that cost one call per run rather than
    per expert (`moekit.dispatch.loops`); each expert is still computed by one thread in one way."""
    if not items:
        return
    if not _helpers_for(len(items), parallel):
        fn(items)
        return
    runs = balanced_chunks(items, min(len(items), RUNS_PER_THREAD * torch.get_num_threads()))
    _take_largest_first(runs, lambda run: sum(t - s for _, s, t in run), fn)


def _helpers_for(tasks: int, parallel: bool) -> bool:
    threads = torch.get_num_threads()
    return parallel and tasks >= 2 and threads >= 2 and worker_pool(threads - 1) is not None


def _take_largest_first(tasks: Sequence[T], size: Callable[[T], int], fn: Callable[[T], None]) -> None:
    """fn(task) for every task on the calling thread and the helpers, each thread taking the
    largest task left when it finishes its last."""
    queue = iter(sorted(tasks, key=size, reverse=True))
    lock = threading.Lock()

    def take_until_done(_: int) -> None:
        while True:
            with lock:
                task = next(queue, None)
            if task is None:
                return
            fn(task)

    run_shares(range(min(torch.get_num_threads(), len(tasks))), take_until_done)


def run_shares(shares: Sequence[T], fn: Callable[[T], None]) -> None:
    """fn(share) for every share at once: the calling thread takes the first, helper threads the
    rest (run in turn on the calling thread where there are no helpers); every torch op inside
    runs single-threaded. At most one share per torch thread."""
    threads = torch.get_num_threads()
    pool = worker_pool(threads - 1) if 1 < len(shares) <= threads else None
    if pool is None:
        for share in shares:
            fn(share)
        return
    own, *others = shares
    futures = [pool.submit(fn, share) for share in others]
    with single_threaded():
        fn(own)
    for future in futures:
        future.result()


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run this thread's torch ops on one OpenMP thread for the duration (a per-thread setting).

    Tiny GEMMs (decode: one or two rows per expert) run faster unthreaded than with MKL's
    hand-off between threads; a no-op where torch's OpenMP library is not found.
    """
    openmp = openmp_library()
    threads = torch.get_num_threads()
    if openmp is None or threads == 1:
        yield
        return
    openmp.omp_set_num_threads(1)
    try:
        yield
    finally:
        openmp.omp_set_num_threads(threads)
