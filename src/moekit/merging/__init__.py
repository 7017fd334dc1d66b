"""Merging fine-tuned copies of one model into one model: task arithmetic, TIES, DARE, PCB.

`merge_state_dicts` merges tensors in memory; `merge_checkpoints` merges moekit runs or HF folders
on disk (the `moekit merge` command). The formulas live in `moekit.merging.methods`.
"""

from __future__ import annotations

from moekit.merging.api import METHODS, fused_expert_count, merge_state_dicts, tensor_seed
from moekit.merging.checkpoints import merge_checkpoints

__all__ = ["METHODS", "fused_expert_count", "merge_checkpoints", "merge_state_dicts", "tensor_seed"]
