"""Expert saliencies: pure functions of the calibration statistics, each naming its paper.

Higher means more worth keeping. Every function takes one layer's `ExpertStats` sums (float64) and
returns an [E] float64 score.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def frequency(count: Tensor, tokens: int) -> Tensor:
    """Routing frequency: the share of calibration tokens routed to each expert (the frequency
    baseline of REAP, Lasby et al. 2025, and of NAEE, Lu et al. 2024)."""
    return count.double() / max(tokens, 1)


def gate_weight(gate_sum: Tensor, tokens: int) -> Tensor:
    """Summed router weight per token ("weighted_frequency_sum" in REAP's code)."""
    return gate_sum.double() / max(tokens, 1)


def reap(reap_sum: Tensor, count: Tensor) -> Tensor:
    """REAP saliency (Lasby et al. 2025, "REAP the Experts", Eq. 4): the mean over the tokens
    routed to expert j of g_j(x) * ||f_j(x)||_2. An expert never routed scores 0 (the paper leaves
    it undefined; the public code divides by zero)."""
    count = count.double()
    return torch.where(count > 0, reap_sum.double() / count.clamp_min(1), torch.zeros_like(count))


def ean(norm_sum: Tensor) -> Tensor:
    """Expert activation norm, summed over routed tokens ("ean_sum", the EAN criterion of
    Jaiswal et al. 2025 used as a baseline in REAP's code)."""
    return norm_sum.double()


def stun_representatives(router_weight: Tensor, keep: int) -> Tensor:
    """STUN (Lee et al. 2024, "STUN: Structured-Then-Unstructured Pruning", §3.2): experts whose
    router rows are close behave alike, so cluster the rows (agglomerative, average linkage on
    Euclidean distance) into `keep` clusters without a forward pass and keep one per cluster: the
    member nearest its cluster's mean row. Returns a score that ranks the representatives first
    (then by closeness to their centroid)."""
    from scipy.cluster.hierarchy import fcluster, linkage

    rows = router_weight.detach().double().cpu().numpy()
    n = rows.shape[0]
    if keep >= n:
        return torch.ones(n, dtype=torch.float64)
    labels = fcluster(linkage(rows, method="average"), t=keep, criterion="maxclust")
    # fcluster may return fewer clusters than asked when distances tie; the ranking still works
    score = np.zeros(n)
    for label in np.unique(labels):
        members = np.nonzero(labels == label)[0]
        distance = np.linalg.norm(rows[members] - rows[members].mean(0), axis=1)
        best = members[np.argmin(distance)]
        score[members] = -distance  # non-representatives: negative, closer first
        score[best] = 1.0 + 1.0 / (1.0 + distance.min())
    return torch.from_numpy(score)


SCORES = ("frequency", "gate_weight", "reap", "ean", "stun")
