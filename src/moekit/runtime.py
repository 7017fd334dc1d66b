"""CPU runtime settings that moekit's commands apply before torch is imported.

Large tensors (expert activations, packed weight gradients) are fresh multi-MB allocations every
step; glibc serves them with mmap, so every step pays a page fault per 4 KiB page. PyTorch's
allocator backs allocations of 2 MiB and more with transparent huge pages when
THP_MEM_ALLOC_ENABLE=1 is set before torch starts, which removes most of that cost (measured in
BENCHMARKS.md). The variable is read once, when torch makes its first allocation.
"""

from __future__ import annotations

import os
import sys


def tune_cpu_runtime() -> bool:
    """Ask torch for transparent huge pages; true if it took effect (torch not yet imported)."""
    if "torch" in sys.modules:
        return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
