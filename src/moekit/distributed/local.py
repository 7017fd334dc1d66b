"""Run a function on N gloo processes of this machine and collect what each returns.

For tests, examples and CPU experiments without torchrun. A hang becomes an error: the processes
get a deadline (and gloo the same timeout for each collective), after which they are killed and
`LocalRunError` names the ranks that had not finished.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moekit.errors import MoekitError


class LocalRunError(MoekitError):
    """A rank of a local run failed or did not finish in time."""


def _encode(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _entry(fn, rank: int, world_size: int, store: str, timeout_s: float, args: tuple, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, _encode(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc().encode()))
        raise SystemExit(1) from None


def run_local(
    fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 120.0
) -> list[Any]:
    """`fn(rank, world_size, *args)` in `world_size` fresh processes joined in one gloo group;
    returns the values they return, by rank. `fn` must be importable (a module-level function)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="moekit-gloo-") as tmp:
        store = str(Path(tmp) / "store")
        processes = [
            context.Process(target=_entry, args=(fn, rank, world_size, store, timeout_s, args, results))
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout_s
        try:
            while len(values) + len(failures) < world_size and time.monotonic() < deadline:
                if _receive(results, values, failures, timeout=1.0):
                    continue
                exited = [p.exitcode for p in processes if p.exitcode is not None]
                if failures or any(code != 0 for code in exited):
                    time.sleep(0.5)  # let the other ranks' reports arrive, then stop waiting
                    while _receive(results, values, failures, timeout=0.1):
                        pass
                    break
            for process in processes:
                process.join(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
    exit_codes = [p.exitcode for p in processes]
    if failures:
        reports = "\n".join(f"--- rank {rank}:\n{_tail(text)}" for rank, text in sorted(failures.items()))
        raise LocalRunError(f"ranks {sorted(failures)} of {world_size} failed:\n{reports}")
    missing = [rank for rank in range(world_size) if rank not in values]
    if missing:
        raise LocalRunError(
            f"ranks {missing} of {world_size} did not report within {timeout_s:.0f} s "
            f"(exit codes {exit_codes}; a hang if they were killed)"
        )
    return [values[rank] for rank in range(world_size)]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _receive(results, values: dict[int, Any], failures: dict[int, str], timeout: float) -> bool:
    """Take one report from the queue; false if none came within `timeout` seconds."""
    try:
        rank, ok, payload = results.get(timeout=timeout)
    except queue.Empty:
        return False
    if ok:
        values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    else:
        failures[rank] = payload.decode()
    return True
