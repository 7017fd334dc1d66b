"""One thread or all of torch's for a generation step, chosen by timing the step itself.

A decode step reads every weight it uses once, for a row or a few: whether a second thread makes
it faster depends on where those weights come from (memory, or a cache that held them since the
last token), on what else runs on the cores (on a loaded machine a thread hand-off waits for the
other thread to be scheduled), and on the step's own mix of small ops and large products. None of
that is answered by a probe of something else (a DRAM read measured that split reads did not
pay on one machine, where llama.cpp's two threads decoded the same model 1.6x faster than its
one). So the steps of a generation are timed both ways: for each step size (rows), the first
steps alternate between all threads and one, `TRIALS` each; then the faster by median is kept,
and every `RETRY_EVERY` steps the other is timed again, so the choice follows the machine's load.
The timings belong to the model (`step_threads_of`), so repeated generations keep what they
learnt. Results do not depend on the choice beyond rounding (tests run both).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from moekit.dispatch.workers import single_threaded

# Steps timed each way before a choice is made.
TRIALS = 3
# Steps on the chosen way between two timings of the other (the load changes).
RETRY_EVERY = 32
# Timings kept per way: the latest ones decide.
KEPT_TIMINGS = 5


@dataclass
class StepTimings:
    """Seconds of recent steps of one size, on one thread and on all of them."""

    one: deque[float] = field(default_factory=lambda: deque(maxlen=KEPT_TIMINGS))
    all: deque[float] = field(default_factory=lambda: deque(maxlen=KEPT_TIMINGS))
    since_retry: int = 0

    def faster_threaded(self) -> bool:
        return statistics.median(self.all) < statistics.median(self.one)

    def next_threaded(self) -> bool:
        """Whether the next step should run on all threads."""
        if len(self.one) < TRIALS or len(self.all) < TRIALS:
            return len(self.all) <= len(self.one)  # alternate, all threads first
        chosen = self.faster_threaded()
        if self.since_retry >= RETRY_EVERY:
            return not chosen
        return chosen

    def add(self, threaded: bool, seconds: float) -> None:
        """Record a step's seconds; steps on the chosen way count towards the next retry."""
        trials_done = len(self.one) >= TRIALS and len(self.all) >= TRIALS
        if trials_done and threaded == self.faster_threaded():
            self.since_retry += 1
        else:
            self.since_retry = 0  # a trial, or the retry of the other way
        (self.all if threaded else self.one).append(seconds)


class StepThreads:
    """The thread choice for the steps of one model, by step size (rows), at one thread count."""

    def __init__(self, threads: int):
        self.threads = threads
        self.by_rows: dict[int, StepTimings] = {}

    def threaded(self, rows: int) -> bool:
        """Whether a step of `rows` rows should run on all threads now."""
        if self.threads < 2:
            return False
        return self.by_rows.setdefault(rows, StepTimings()).next_threaded()

    @contextmanager
    def step(self, rows: int) -> Iterator[None]:
        """Run a step of `rows` rows on the threads chosen for it, and time it."""
        threaded = self.threaded(rows)
        start = time.perf_counter()
        with nullcontext() if threaded else single_threaded():
            yield
        if self.threads >= 2:
            self.by_rows[rows].add(threaded, time.perf_counter() - start)


def step_threads_of(model: nn.Module) -> StepThreads:
    """The model's step timings at torch's current thread count (kept on the model, like its
    RoPE tables, and started afresh when the thread count changes)."""
    threads = torch.get_num_threads()
    kept = model.__dict__.get("_step_threads")
    if kept is None or kept.threads != threads:
        kept = StepThreads(threads)
        model.__dict__["_step_threads"] = kept
    return kept
