"""The indices of each row's k largest scores, as torch.topk gives them, in a fraction of its time
on the CPU (`csrc/topk_rows.cpp`).

A router takes each token's top k experts once per layer and step. torch.topk on the CPU sorts a
(value, index) buffer per row: 3.9 ms on one thread for a [2048, 128] score matrix with k = 8, 2 ms
of a 55 ms very fine fwd+bwd on two. The kernel finds the k largest by k vectorised passes, and
only where they are distinct from each other and from the rest of the row, where the values alone
fix torch.topk's answer; the rows it flags (ties, NaN) go to torch.topk itself, so the indices are
torch.topk's on every row (HF's routers call torch.topk: its order among equal scores is theirs).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from moekit.kernels import native

# Below these the kernel does not pay: under 64 rows its fixed cost (two outputs, reading the
# flags on the host; about 16 us) exceeds torch.topk's whole time (8 us for 16 to 32 rows of 64 to
# 128), and under 16 scores a row is less than one AVX-512 vector, so its passes run their scalar
# remainder (2048 rows of 8, k = 2: 0.6x torch's speed; of 16: 7x; of 128, k = 8: 4x).
MIN_ROWS = 64
MIN_WIDTH = 16


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """`scores.topk(k, dim=-1).indices` of a 2-D score matrix; on the kernel for contiguous fp32
    CPU scores of at least MIN_ROWS x MIN_WIDTH where the probe passed, else torch.topk."""
    if torch.compiler.is_compiling() or scores.dim() != 2:  # (no guards on the shape under compile)
        return scores.topk(k, dim=-1).indices
    if scores.shape[0] < MIN_ROWS or scores.shape[1] < MIN_WIDTH or not fits(scores, k):
        return scores.topk(k, dim=-1).indices
    return kernel_topk_indices(scores, k)


def kernel_topk_indices(scores: Tensor, k: int) -> Tensor:
    """torch.topk's indices from the kernel, the rows it flags from torch.topk (where `fits`)."""
    with torch.no_grad():
        index, flagged = torch.ops.moekit.topk_rows(scores.detach(), k)
        if bool(flagged.any()):
            rows = flagged.nonzero().squeeze(1)
            index[rows] = scores.detach()[rows].topk(k, dim=-1).indices
    return index


def fits(scores: Tensor, k: int) -> bool:
    return (
        scores.dim() == 2
        and scores.dtype == torch.float32
        and scores.device.type == "cpu"
        and scores.is_contiguous()
        and 1 <= k <= scores.shape[1]
        and not torch.compiler.is_compiling()
        and matches_torch()
    )


@cache
def matches_torch() -> bool:
    """Whether the kernel is built and gives torch.topk's indices on a probe: random rows, rows with
    equal scores, NaN and infinities, k from 1 to the row's width."""
    if not native.loops_available() or not hasattr(torch.ops.moekit, "topk_rows"):
        return False
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        for width in (1, 2, 7, 8, 16, 17, 64, 128, 160):
            scores = torch.randn(64, width, generator=gen)
            scores[::4] = scores[::4].round()  # many equal scores
            scores[1::8, 0] = float("nan")
            scores[2::8, -1] = float("inf")
            scores[3::8, : width // 2] = float("-inf")
            for k in sorted({1, min(2, width), min(8, width), width}):
                index, flagged = torch.ops.moekit.topk_rows(scores, k)
                expected = scores.topk(k, dim=-1).indices
                if not torch.equal(index[~flagged], expected[~flagged]):
                    return False
    return True
