"""`upcycle`: one entry point for HF folders and moekit runs alike (what `moekit upcycle` calls)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moekit.construct.hf import UpcycleRecipe, upcycle_hf
from moekit.errors import MoekitError


def source_kind(src: Path) -> str:
    """'hf' for a folder with config.json, 'moekit' for a run or checkpoint directory."""
    from moekit.train.checkpoint import LATEST_FILE, STATE_FILE

    if (src / "config.json").is_file():
        return "hf"
    if any(
        (base / name).is_file() for base in (src, src / "checkpoints") for name in (STATE_FILE, LATEST_FILE)
    ):
        return "moekit"
    raise MoekitError(
        f"{src}: neither an HF model folder (config.json) nor a moekit run or checkpoint "
        "(state.json or latest)"
    )


def upcycle(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    recipe: UpcycleRecipe,
    *,
    corpus: str | None = None,
    prompts: list[list[str]] | None = None,
    overwrite: bool = False,
    dtype: Any = None,
) -> dict[str, Any]:
    """Upcycle the dense model at `src` into an MoE at `dst` and return the receipt (also written
    to `dst/upcycle_receipt.json`). HF folders give HF folders of the matching MoE family; moekit
    runs give a moekit checkpoint folder that `model.init_from` trains on."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise MoekitError(f"{src}: no such folder")
    if dst.exists() and not overwrite:
        raise MoekitError(f"{dst}: already exists (pass --overwrite to replace it)")
    if source_kind(src) == "hf":
        return upcycle_hf(
            src, dst, recipe, dtype=dtype, corpus=corpus or "builtin", prompts=prompts, overwrite=overwrite
        )
    from moekit.construct.lm import upcycle_run

    return upcycle_run(src, dst, recipe, corpus=corpus, prompts=prompts, overwrite=overwrite)
