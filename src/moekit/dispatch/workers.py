"""Helper threads whose torch ops run single-threaded, for the one-off split-reads trial.

The expert dispatch no longer hands experts to Python threads (its C++ loops run them on torch's
own threads, `moekit.kernels.native`). What remains here serves the measurement of whether a
decode step's weight reads go faster split over the threads than on one
(`dispatch/bandwidth.py`), and generation's small steps on one thread (`inference/generate.py`):
torch's OpenMP thread count is a per-thread setting of its libgomp, set through ctypes.

The pool is created on first use, one per process and thread count, and is never mutated after.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import TypeVar

import torch

T = TypeVar("T")


@cache
def openmp_library() -> ctypes.CDLL | None:
    """torch's own libgomp (the library its kernels use), if this build uses GNU OpenMP."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    if not os.path.exists(path):
        return None
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


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

    Tiny products (decode: one or two rows per expert) run faster unthreaded than with a library's
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
