"""CPU runtime settings that moekit's commands apply before torch is imported.

Large tensors (expert activations, packed weight gradients) are fresh multi-MB allocations every
step; glibc serves them with mmap, so every step pays a page fault per 4 KiB page. PyTorch's
allocator backs allocations of 2 MiB and more with transparent huge pages when
THP_MEM_ALLOC_ENABLE=1 is set before torch starts, which removes most of that cost (measured in
BENCHMARKS.md). The variable is read once, when torch makes its first allocation.

GOMP_SPINCOUNT: after each parallel region OpenMP's idle threads spin before sleeping, taking cores
that the rest of a step (and, on a shared machine, other work) needs, so the spin is shortened. Both are read
when torch starts, hence this runs before `import torch`.
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
