"""Kernel choices measured once per machine and kept on disk, so every process makes the same one.

Timing two kernels in each process lets the winner change with the machine's load, and the two
round differently: the same config and seed then trains to different losses in different
processes. A choice is therefore measured once, under a file lock (so that concurrent first runs
agree), and stored as JSON in `$MOEKIT_CACHE_DIR` (default `$XDG_CACHE_HOME/moekit/kernels`, else
`~/.cache/moekit/kernels`), keyed by the CPU model (its name and family/model/stepping numbers),
its vector capability and torch's version.
Delete the file to measure again. A measurement disturbed by other work on the machine (its
threads kept waiting for a core) is taken again; where every attempt is, a safe default is stored
rather than what the load picked.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

CACHE_ENV = "MOEKIT_CACHE_DIR"


def cache_dir() -> Path:
    """Where kernel choices are stored: $MOEKIT_CACHE_DIR, else $XDG_CACHE_HOME/moekit/kernels."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moekit" / "kernels"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_signature(cpuinfo: str | None = None) -> str:
    """The CPU's family, model and stepping numbers ("family 25 model 1 stepping 1"), from
    /proc/cpuinfo (or `cpuinfo`, its text); "" where it gives none. Why: a virtual machine may
    report one model name for several generations (seen: "AMD EPYC" for CPUs with AVX2 only, with
    AVX-512 on a 256-bit datapath and with full-width AVX-512, which run the kernels at very
    different speeds); these numbers tell them apart."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    parts = [
        f"{name} {fields[key]}"
        for key, name in (("cpu family", "family"), ("model", "model"), ("stepping", "stepping"))
        if fields.get(key)
    ]
    return " ".join(parts)


def machine_key() -> dict[str, str]:
    """What a stored choice is valid for: the same CPU (model name and family/model/stepping) and
    capability, the same torch."""
    return {
        "cpu": cpu_model(),
        "cpu_signature": cpu_signature(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }


def choice_path(name: str) -> Path:
    key = json.dumps(machine_key(), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / f"{name}-{digest}.json"


def _read_choice(path: Path, allowed: tuple[str, ...]) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("machine") != machine_key():
        return None
    choice = data.get("choice")
    return choice if choice in allowed else None


# A measurement during which this process's threads waited, in all, more than this share of the
# time they could have run for a core (other work on the machine) is disturbed, and taken again.
# Measured on a 2-core AVX2 EPYC, the GEMM probe on 2 threads: 0.05 % quiet, 35 % beside one busy
# process. A choice made under such load once stored oneDNN there: 10-20 % slower than MKL on the
# dense layers' products, the layer benchmark's dense reference up to 45 % slower.
DISTURBED_WAIT_SHARE = 0.1
# Measurements tried before a disturbed one decides (as `stored_choice` says).
MEASURE_ATTEMPTS = 3


def runqueue_wait_ns() -> int | None:
    """Nanoseconds this process's threads have waited for a core so far (Linux schedstat, the
    threads alive now), None where the kernel does not report it."""
    total, seen = 0, False
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            total += int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[1])
            seen = True
        except (OSError, IndexError, ValueError):
            continue
    return total if seen else None


def measured_quietly(measure: Callable[[], str]) -> tuple[str, bool]:
    """measure(), and whether its threads ran undisturbed (waited for a core under
    DISTURBED_WAIT_SHARE of the time; true where the wait cannot be read)."""
    before, start = runqueue_wait_ns(), time.perf_counter()
    choice = measure()
    wall_ns, after = (time.perf_counter() - start) * 1e9, runqueue_wait_ns()
    if before is None or after is None or wall_ns <= 0:
        return choice, True
    share = (after - before) / (wall_ns * max(1, torch.get_num_threads()))
    return choice, share < DISTURBED_WAIT_SHARE


def stored_choice(
    name: str, allowed: tuple[str, ...], measure: Callable[[], str], disturbed: str | None = None
) -> str:
    """The stored choice `name` for this machine, measuring it (once, under a lock) if absent.
    Where the cache directory cannot be written, the choice is measured in this process only. A
    measurement disturbed by other work on the machine is taken again (MEASURE_ATTEMPTS in all);
    if every one is disturbed, `disturbed` (a safe default, where given) is stored instead of a
    winner that the load may have picked, marked `"quiet": false` (delete the file to measure
    again). Stored either way, so that processes started together still agree."""
    path = choice_path(name)
    found = _read_choice(path, allowed)
    if found is not None:
        return found
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 (held across the measurement)
    except OSError:
        return measure()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _read_choice(path, allowed)  # another process may have measured while we waited
        if found is not None:
            return found
        for _ in range(MEASURE_ATTEMPTS):
            choice, quiet = measured_quietly(measure)
            if quiet:
                break
        else:
            choice = disturbed if disturbed is not None else choice
        data = {"machine": machine_key(), "choice": choice, "quiet": quiet}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
        return choice
