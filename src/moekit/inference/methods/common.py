"""Full-sequence forwards shared by the methods: one call shape for moekit's LM and HF families."""

from __future__ import annotations

from torch import Tensor, nn

from moekit.inference.generate import _model_kind


def positions_of(real: Tensor) -> Tensor:
    """Positions counting real tokens only (left padding gets position 1, as generation does)."""
    return (real.long().cumsum(-1) - 1).masked_fill(~real, 1)


def full_logits(model: nn.Module, input_ids: Tensor, real: Tensor) -> Tensor:
    """Logits [B, S, V] of every position of left-padded rows (`real` False on padding)."""
    positions = positions_of(real)
    if _model_kind(model) == "family":
        return model(input_ids, attention_mask=real.long(), position_ids=positions).logits
    return model(input_ids, positions=positions, token_mask=real).logits


def next_token_loss(logits: Tensor, input_ids: Tensor, real: Tensor) -> Tensor:
    """Mean cross-entropy of each real token given the real tokens before it."""
    import torch.nn.functional as F

    targets = input_ids[:, 1:]
    keep = real[:, 1:] & real[:, :-1]
    losses = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return (losses * keep).sum() / keep.sum().clamp_min(1)
