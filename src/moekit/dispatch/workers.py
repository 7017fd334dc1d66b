"""This thread's torch ops on one OpenMP thread, and whether a product pays a hand-off between threads.

The expert dispatch no longer hands experts to Python threads (its C++ loops run them on torch's
own threads, `moekit.kernels.native`). What remains here serves generation's steps on one thread
(`inference/generate.py`, `inference/step_threads.py`): torch's OpenMP thread count is a
per-thread setting of its libgomp, set through ctypes; and the rough estimate by which small
products are run on one thread without being timed (`inference/generate.py`,
`dispatch/few_rows.py`).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

# Rough single-core rates of an x86 core of the AVX2/AVX-512 class, and the least time of a
# product worth a hand-off between threads: an estimate of what is too small to time, only
# (`too_small_to_share`).
CORE_FLOPS_PER_S = 100e9
CORE_BYTES_PER_S = 10e9
MIN_THREADED_SECONDS = 100e-6


def too_small_to_share(read_bytes: float, flops: float = 0.0) -> bool:
    """Whether work that reads `read_bytes` and does `flops` takes one core less time than a
    hand-off between threads pays for (the rough rates above): such work runs on one thread."""
    return max(read_bytes / CORE_BYTES_PER_S, flops / CORE_FLOPS_PER_S) < MIN_THREADED_SECONDS


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
