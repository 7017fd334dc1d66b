"""A training run's own entries in its out_dir, found and replaced as a whole.

Why: a run trained into a folder that already holds one would write its checkpoints beside the
old run's and append to its metrics: a mix that neither run made. `moekit train` refuses such a
folder unless told to continue (`--resume`) or replace it (`--overwrite`); the demo replaces its
own previous runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# What `moekit train` writes into `out_dir`: a run is there when either is (the checkpoints folder
# only when it holds something). `--overwrite` removes exactly these, nothing else of the folder.
RUN_ENTRIES = ("checkpoints", "metrics.jsonl")


def existing_run(out_dir: Path) -> list[str]:
    """The entries of a previous run in `out_dir` (empty: no run there): a metrics.jsonl, or a
    checkpoints/ folder with anything in it (a step, the `latest` pointer, a killed write)."""
    found = []
    for name in RUN_ENTRIES:
        path = out_dir / name
        if path.is_dir():
            if any(path.iterdir()):
                found.append(f"{name}/")
        elif path.exists() or path.is_symlink():
            found.append(name)
    return found


def remove_previous_run(out_dir: Path) -> None:
    """Remove the previous run's checkpoints/ and metrics.jsonl: each is first renamed (atomically)
    into one hidden folder of `out_dir`, then that folder is deleted, so that the new run never
    writes beside a part of the old one. The rest of `out_dir` (a config file, an analysis) stays."""
    if not existing_run(out_dir):
        return
    for stale in out_dir.glob(".overwritten.*"):  # left by a removal that was killed
        shutil.rmtree(stale, ignore_errors=True)
    trash = Path(tempfile.mkdtemp(prefix=".overwritten.", dir=out_dir))
    for name in RUN_ENTRIES:
        path = out_dir / name
        if path.exists() or path.is_symlink():
            os.replace(path, trash / name)
    shutil.rmtree(trash, ignore_errors=True)
