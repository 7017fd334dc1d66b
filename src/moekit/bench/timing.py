"""Side-by-side timing: contenders interleaved round by round, medians after warm-up."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping


def interleaved_medians(
    steps: Mapping[str, Callable[[], float]], repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds of each step (each call returns the seconds it measured) over `repeats`
    rounds after `warmup`. Every round runs every step once, in an order rotated from round to
    round, since what ran just before affects the caches; the machine's noise hits all alike."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = steps[name]()
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}
