"""The language-model loss as a *sum* over target tokens, to be divided by the global token count.

A mean per micro-batch weights the tokens of small micro-batches more and changes with the number
of accumulation steps and ranks (moe-systems.md P1). Summing here and dividing once by the number
of target tokens in the whole global batch (`accumulate_gradients` does) is exact for any split.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def summed_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Σ over target tokens of −log softmax(logits)[target]; `logits` [..., V], `targets` [...]."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )


def count_target_tokens(targets: Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Target tokens that count in the loss (known before the forward pass)."""
    return int((targets != ignore_index).sum())
