"""CPU runtime settings that moekit's commands apply before torch is imported.

Large tensors (expert activations, packed weight gradients) are fresh multi-MB allocations every
step; glibc serves them with mmap, so every step would pay a page fault per 4 KiB page:
`keep_freed_memory` has them reuse the heap's pages instead. Transparent huge pages
(THP_MEM_ALLOC_ENABLE=1) are not used: each 16 MB allocation took ~15 ms of the kernel's
compaction, and huge pages for the expert weights alone took 0.5-1.7 % off fwd+bwd
(BENCHMARKS.md §1 and §13).

GOMP_SPINCOUNT: after each parallel region OpenMP's idle threads spin before sleeping, taking cores
that the rest of a step (and, on a shared machine, other work) needs, so the spin is shortened. It
is read when torch starts, hence `tune_cpu_runtime` runs before `import torch`.
"""

from __future__ import annotations

import os
import sys

RUNTIME_DEFAULTS = {"GOMP_SPINCOUNT": "10000"}


def tune_cpu_runtime() -> bool:
    """Set the defaults above (a user's own values win); true if torch was not yet imported,
    i.e. if they take effect."""
    if "torch" in sys.modules:
        return False
    for key, value in RUNTIME_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return True


def keep_freed_memory() -> bool:
    """Tell glibc malloc to serve large blocks from the heap and keep freed memory, so that the
    multi-MB tensors allocated every step reuse pages instead of page-faulting new ones."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    # One arena: helper threads' arenas would otherwise trim (and page-fault back) what oneDNN
    # allocates and frees on every GEMM they run.
    settings = ((m_mmap_max, 0), (m_trim_threshold, 2**30), (m_arena_max, 1))
    return all(bool(mallopt(option, value)) for option, value in settings)
