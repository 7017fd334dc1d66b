"""Which kernels and threads a run computes with, recorded in its checkpoints and metrics.

The kernels round differently (MKL against oneDNN, moekit's native kernel against both, one
thread against two), so a run's losses are a function of them as well as of its config and seed.
A checkpoint records them; resuming re-applies them, so that the resumed run continues with the
kernels it started with even where this process would have chosen others.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from moekit.kernels import gemm
from moekit.kernels.native import cpu_isa, float32_kernel, kernel_isa, loops_available, native_available
from moekit.kernels.store import machine_key


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kernel_record(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The kernels products of `dtype` take in this process, and its thread settings."""
    return {
        "gemm": {dtype_name(dtype): gemm.gemm_kernel(dtype)},
        "native": native_available(),
        "expert_loops": (float32_kernel() if dtype == torch.float32 else "mm")
        if loops_available()
        else "portable",
        "threads": torch.get_num_threads(),
        # the vector set the expert kernels were built for (`MOEKIT_NATIVE_ISA` can force another
        # than the CPU's): both kernels' SwiGLU runs in its vectors, and AVX-512's reciprocal
        # rounds the sigmoid differently from AVX2's division
        "tile_isa": kernel_isa() if loops_available() else None,
        "machine": machine_key(),
    }


def apply_kernel_record(record: dict[str, Any], dtype: torch.dtype = torch.float32) -> list[str]:
    """Make this process compute with the kernels of `record` (from `kernel_record`): pins the
    GEMM kernel through `MOEKIT_GEMM`, the experts' kernel through `MOEKIT_NATIVE`, restores the
    thread count. Returns what changed; warns about what cannot be
    matched here (another machine, a native kernel that does not run here)."""
    changed: list[str] = []
    name = dtype_name(dtype)
    wanted = (record.get("gemm") or {}).get(name)
    if wanted in ("mkl", "onednn") and wanted != gemm.gemm_kernel(dtype):
        settings = {k: v for k, v in _per_dtype_setting().items() if k != name}
        settings[name] = wanted
        os.environ["MOEKIT_GEMM"] = ",".join(f"{k}={v}" for k, v in sorted(settings.items()))
        gemm.onednn_is_faster.cache_clear()
        changed.append(f"gemm {name}={wanted}")
    threads = record.get("threads")
    if isinstance(threads, int) and threads >= 1 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        changed.append(f"threads={threads}")
    loops = record.get("expert_loops")
    here = kernel_record(dtype)["expert_loops"]
    if loops in ("tile", "mm", "portable") and loops != here:
        os.environ["MOEKIT_NATIVE"] = "0" if loops == "portable" else loops
        changed.append(f"expert_loops={loops}")
    elif record.get("native") is False and native_available():  # a record from before expert_loops
        os.environ["MOEKIT_NATIVE"] = "0"
        changed.append("native=off")
    now = kernel_record(dtype)  # with the settings above applied
    mismatches = []
    if loops in ("tile", "mm", "portable") and now["expert_loops"] != loops:
        mismatches.append(f"its expert loops ({loops}) do not run here")
    elif record.get("native") is True and not native_available():
        mismatches.append("the native kernel it used does not run here")
    wanted_isa, isa_here = record.get("tile_isa"), now["tile_isa"]
    if loops in ("tile", "mm") and wanted_isa is not None and isa_here is not None and wanted_isa != isa_here:
        # only an AVX-512 CPU builds the AVX-512 kernels; every other set can be forced here
        mismatch = f"its expert kernels were built for {wanted_isa}, here for {isa_here}"
        if wanted_isa != "avx512" or cpu_isa() == "avx512":
            mismatch += f" (MOEKIT_NATIVE_ISA={wanted_isa} at the start of a process builds that one)"
        mismatches.append(mismatch)
    if not same_machine(record.get("machine"), now["machine"]):
        mismatches.append("it ran on another machine or torch version")
    if mismatches:
        warnings.warn(
            "moekit: resuming with other kernels than the run used (" + "; ".join(mismatches) + "): "
            "the resumed run will not match an uninterrupted one bit for bit",
            RuntimeWarning,
            stacklevel=2,
        )
    return changed


def same_machine(recorded: Any, here: dict[str, str]) -> bool:
    """Whether a record's machine (`machine_key` when it was written) is this one, by the fields
    it has: records written before a field was added (the CPU's family/model/stepping) are
    compared without it. No record counts as the same machine."""
    if not isinstance(recorded, dict):
        return True
    return all(here.get(field) == value for field, value in recorded.items())


def _per_dtype_setting() -> dict[str, str]:
    setting = os.environ.get("MOEKIT_GEMM", "").strip().lower()
    if "=" not in setting:
        return {}
    return dict(part.split("=", 1) for part in setting.split(",") if "=" in part)
