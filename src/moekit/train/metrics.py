"""Training metrics: one JSON object per line, and a progress bar with tokens/s, loss and ETA."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moekit.io import write_text_atomic


class MetricsLog:
    """Appends records to a JSONL file; each line is written and flushed whole."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = json.dumps(clean, sort_keys=False) + "\n"
        with open(self.path, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def keep_through(self, step: int) -> None:
        """Drop the records of steps after `step` (rewritten atomically; a torn last line from a
        killed writer is dropped too)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        write_text_atomic(self.path, "".join(kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """tqdm over optimizer steps (its ETA), showing the latest loss and throughput."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = ""):
        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True
        )

    def update(self, loss: float, tokens_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
