"""A decoding step's queries, keys and values from their joined projection in one call of
moekit's kernel (`csrc/attention_step.cpp`): per-head norms, RoPE's rotation and the KV cache
append, with torch's arithmetic (the RMSNorm and rotation kernels' code, used only where their
probes found torch's values bit for bit: `kernels.rms_norm`, `kernels.rope`).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from moekit.kernels import rms_norm, rope


def fits(qkv: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether `qk_norm_rope_append` takes a step's joined projection `qkv` [B, 1, N] and tables:
    fp32 CPU operands outside autograd, few enough values that torch's norm sums each row on one
    thread (the order the kernel repeats), and the probes passed."""
    if qkv.dtype != torch.float32 or qkv.device.type != "cpu" or qkv.numel() >= rms_norm.MAX_ELEMENTS:
        return False
    for table in (cos, sin):
        if table.dtype != torch.float32 or not table.is_contiguous():
            return False
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and qkv.requires_grad):
        return False
    return rms_norm.matches_torch() and rope.matches_torch() and kernel_built()


@cache
def kernel_built() -> bool:
    return hasattr(torch.ops.moekit, "qk_norm_rope_append")
