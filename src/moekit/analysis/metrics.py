"""Routing-health metrics as pure functions of trace tensors (no model, no files, no state).

Each function names the paper or the textbook definition it computes. Conventions: expert ids are
int64 with -1 for "no expert" (a padded slot), labels (domains, token ids) are int64 with -1 for
"unknown"; both are left out of every count. Undefined ratios are NaN, never a made-up number.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# -- load ----------------------------------------------------------------------------------------


def coefficient_of_variation(load: Tensor) -> float:
    """std/mean of per-expert loads (population std): 0 = perfectly even. NaN without any load."""
    load = load.to(torch.float64)
    if load.numel() == 0 or float(load.mean()) == 0.0:
        return float("nan")
    return float(load.std(correction=0) / load.mean())


def max_violation(load: Tensor) -> float:
    """MaxVio = (max load - mean load) / mean load (Wang et al. 2024, Loss-Free Balancing, eq. 9)."""
    load = load.to(torch.float64)
    if load.numel() == 0 or float(load.mean()) == 0.0:
        return float("nan")
    return float((load.max() - load.mean()) / load.mean())


def dead_experts(load: Tensor) -> list[int]:
    """Experts that processed no token at all: capacity paid for and never used."""
    return [int(i) for i in torch.nonzero(load == 0).flatten()]


def overloaded_experts(load: Tensor, factor: float = 2.0) -> list[int]:
    """Experts whose load exceeds `factor` times the mean load (stragglers under expert parallelism)."""
    load = load.to(torch.float64)
    if load.numel() == 0:
        return []
    return [int(i) for i in torch.nonzero(load > factor * load.mean()).flatten()]


def experts_per_token_histogram(experts: Tensor, num_compute_experts: int | None = None) -> list[int]:
    """How many tokens chose 0, 1, ..., k experts: the k histogram of dynamic routers (top-p, #9;
    null experts, #34: pass `num_compute_experts` to count only experts that cost compute)."""
    real = experts >= 0
    if num_compute_experts is not None:
        real &= experts < num_compute_experts
    chosen = real.sum(dim=1)
    return [int(c) for c in torch.bincount(chosen, minlength=experts.shape[1] + 1)]


# -- router confidence ---------------------------------------------------------------------------


def token_entropy(probabilities: Tensor) -> Tensor:
    """Shannon entropy (nats) of each token's routing distribution, [T] from [T, E]: log E is a
    router indifferent between experts, 0 a one-hot router."""
    return torch.special.entr(probabilities.to(torch.float64).clamp_min(0.0)).sum(dim=-1).float()


def topk_margin(probabilities: Tensor, chosen: Tensor) -> Tensor:
    """Per token, the weakest chosen expert's probability minus the strongest unchosen one's, [T].

    How close the router is to flipping a selection; negative when a selection bias (DeepSeek-V3)
    overrode the scores. NaN for a token that chose no expert or every expert."""
    num_tokens, num_experts = probabilities.shape
    mask = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(chosen >= 0, chosen, num_experts).cpu(), True)
    mask = mask[:, :num_experts].to(probabilities.device)
    p = probabilities.to(torch.float64)
    weakest = torch.where(mask, p, torch.inf).amin(dim=1)
    strongest_other = torch.where(mask, -torch.inf, p).amax(dim=1)
    margin = weakest - strongest_other
    return torch.where(torch.isfinite(margin), margin, torch.nan).float()


# -- capacity dropping ---------------------------------------------------------------------------


def drop_rate_by_position(
    dropped: Tensor, chosen: Tensor, positions: Tensor, bin_width: int = 1
) -> tuple[list[int], list[float], list[int]]:
    """Fraction of chosen assignments that capacity dropped, per position bin (OpenMoE, Xue et al.
    2024, §5 "Drop-towards-the-End": later tokens of a sequence are dropped more often).

    `dropped`, `chosen` bool [N, k]; `positions` int64 [N]. Returns (bin starts, drop rates,
    chosen assignments per bin); a bin with nothing chosen has rate NaN."""
    if positions.numel() == 0:
        return [], [], []
    per_token_chosen = chosen.sum(dim=1).to(torch.float64)
    per_token_dropped = (dropped & chosen).sum(dim=1).to(torch.float64)
    bins = torch.div(positions.clamp_min(0), bin_width, rounding_mode="floor")
    num_bins = int(bins.max()) + 1
    totals = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, per_token_chosen)
    drops = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, per_token_dropped)
    rates = torch.where(totals > 0, drops / totals.clamp_min(1.0), torch.nan)
    return (
        [i * bin_width for i in range(num_bins)],
        [float(r) for r in rates],
        [int(t) for t in totals],
    )


# -- information between labels ------------------------------------------------------------------


def contingency(a: Tensor, b: Tensor, size_a: int | None = None, size_b: int | None = None) -> Tensor:
    """Joint counts [A, B] of two label vectors; pairs where either label is negative are skipped."""
    valid = (a >= 0) & (b >= 0)
    a, b = a[valid], b[valid]
    size_a = size_a if size_a is not None else (int(a.max()) + 1 if a.numel() else 0)
    size_b = size_b if size_b is not None else (int(b.max()) + 1 if b.numel() else 0)
    flat = torch.bincount(a * size_b + b, minlength=size_a * size_b)
    return flat.reshape(size_a, size_b)


def entropy_of_counts(counts: Tensor) -> float:
    """Shannon entropy (nats) of the distribution proportional to `counts`."""
    counts = counts.to(torch.float64).flatten()
    total = float(counts.sum())
    if total == 0:
        return 0.0
    return float(torch.special.entr(counts / total).sum())


def mutual_information(joint: Tensor) -> float:
    """I(A; B) in nats from joint counts [A, B] (Cover & Thomas, eq. 2.28): H(A) + H(B) - H(A, B)."""
    return max(
        0.0, entropy_of_counts(joint.sum(1)) + entropy_of_counts(joint.sum(0)) - entropy_of_counts(joint)
    )


NMI_NORMALIZATIONS = ("b", "sqrt", "arithmetic", "min", "max")


def normalized_mutual_information(a: Tensor, b: Tensor, normalization: str = "b") -> float:
    """Mutual information between two label vectors, normalised to [0, 1].

    The default divides by H(b): with a = expert ids and b = domain labels it is I(expert; domain)
    / H(domain), the share of the domain's uncertainty that the expert choice removes (papers.md C6;
    1 when every expert serves a single domain, 0 when routing ignores the domain). "sqrt",
    "arithmetic", "min", "max" are the symmetric normalisations of Vinh et al. 2010 (JMLR 11, table
    2). NaN when the normaliser is zero (a constant label)."""
    if normalization not in NMI_NORMALIZATIONS:
        raise ValueError(f"normalization: got {normalization!r}, expected one of {NMI_NORMALIZATIONS}")
    joint = contingency(a, b)
    h_a, h_b = entropy_of_counts(joint.sum(1)), entropy_of_counts(joint.sum(0))
    scale = {
        "b": h_b,
        "sqrt": math.sqrt(h_a * h_b),
        "arithmetic": (h_a + h_b) / 2,
        "min": min(h_a, h_b),
        "max": max(h_a, h_b),
    }[normalization]
    if scale <= 0:
        return float("nan")
    return min(1.0, mutual_information(joint) / scale)


def top_expert_share(counts: Tensor, n: int = 1) -> Tensor:
    """Per row of [D, E] counts (domain x expert), the share of the row going to its n busiest
    experts (the "top-n expert share per domain" of Qiu et al. 2025, global-batch LBL, #53). NaN
    for an empty row."""
    counts = counts.to(torch.float64)
    n = min(n, counts.shape[1])
    top = counts.topk(n, dim=1).values.sum(dim=1) if n else torch.zeros(counts.shape[0], dtype=torch.float64)
    totals = counts.sum(dim=1)
    return torch.where(totals > 0, top / totals.clamp_min(1.0), torch.nan)


def label_purity(experts: Tensor, labels: Tensor, min_count: int = 1) -> tuple[float, float]:
    """How well a label predicts routing: the fraction of tokens whose expert is their label's
    majority expert (OpenMoE, Xue et al. 2024, §5 "Context-Independent Specialization": with
    labels = token ids this is token-id purity, high when routing follows token ids, not context).

    Only labels seen at least `min_count` times count (a label seen once is trivially pure).
    Returns (purity, coverage = the fraction of valid tokens that were counted)."""
    valid = (experts >= 0) & (labels >= 0)
    experts, labels = experts[valid], labels[valid]
    if experts.numel() == 0:
        return float("nan"), 0.0
    _, label_index = torch.unique(labels, return_inverse=True)
    joint = contingency(label_index, experts)
    per_label = joint.sum(dim=1)
    eligible = per_label >= min_count
    covered = int(per_label[eligible].sum())
    if covered == 0:
        return float("nan"), 0.0
    return float(joint[eligible].max(dim=1).values.sum()) / covered, covered / experts.numel()


def majority_expert(experts: Tensor, labels: Tensor, num_labels: int, min_count: int = 1) -> Tensor:
    """Each label's most frequent expert, int64 [num_labels]; -1 for labels seen < min_count times."""
    joint = contingency(labels, experts, size_a=num_labels)
    if joint.shape[1] == 0:
        return torch.full((num_labels,), -1, dtype=torch.long)
    best = joint.argmax(dim=1)
    return torch.where(joint.sum(dim=1) >= max(min_count, 1), best, -1)


# -- cross-layer ---------------------------------------------------------------------------------


def multi_hot(experts: Tensor, num_experts: int) -> Tensor:
    """bool [N, E] from [N, k] expert ids (-1 ignored)."""
    hot = torch.zeros(experts.shape[0], num_experts + 1, dtype=torch.bool)
    hot.scatter_(1, torch.where(experts >= 0, experts, num_experts), True)
    return hot[:, :num_experts]


def coactivation_counts(experts_a: Tensor, experts_b: Tensor, num_a: int, num_b: int) -> Tensor:
    """[Ea, Eb]: tokens that chose expert i in layer a and expert j in layer b (co-activation
    across depth, as in Lo et al. 2024, "A closer look into MoE in LLMs", #12)."""
    hot_a = multi_hot(experts_a, num_a).to(torch.float64)
    hot_b = multi_hot(experts_b, num_b).to(torch.float64)
    return (hot_a.T @ hot_b).round().long()


def top_partner_rate(coactivation: Tensor, activations: Tensor) -> float:
    """Mean over layer-a experts (weighted by their activations) of max_j P(expert j in layer b |
    expert i in layer a): 1 when each expert always hands its tokens to the same partner."""
    activations = activations.to(torch.float64)
    total = float(activations.sum())
    if total == 0:
        return float("nan")
    best = coactivation.to(torch.float64).max(dim=1).values
    return float(best.sum() / total)


# -- drift between two routings of the same tokens -----------------------------------------------


def top1_agreement(top1_a: Tensor, top1_b: Tensor) -> float:
    """Fraction of tokens whose preferred expert is the same in both routings."""
    valid = (top1_a >= 0) | (top1_b >= 0)
    if int(valid.sum()) == 0:
        return float("nan")
    return float((top1_a[valid] == top1_b[valid]).to(torch.float64).mean())


def topk_jaccard(experts_a: Tensor, experts_b: Tensor, num_experts: int) -> float:
    """Mean over tokens of |A ∩ B| / |A ∪ B| for their chosen expert sets (tokens with none skipped)."""
    hot_a, hot_b = multi_hot(experts_a, num_experts), multi_hot(experts_b, num_experts)
    union = (hot_a | hot_b).sum(dim=1)
    inter = (hot_a & hot_b).sum(dim=1)
    valid = union > 0
    if int(valid.sum()) == 0:
        return float("nan")
    return float((inter[valid].to(torch.float64) / union[valid]).mean())


def token_map_agreement(
    top1_a: Tensor, top1_b: Tensor, token_ids: Tensor, min_count: int = 1
) -> tuple[float, float]:
    """Stability of the token-id -> expert map (OpenMoE, Xue et al. 2024, §5 "Early Routing
    Learning"): map each token id seen >= min_count times to its majority expert in each routing.
    Returns (fraction of those ids mapped to the same expert, Jaccard overlap of the two maps as
    sets of (id, expert) pairs)."""
    if token_ids.numel() == 0:
        return float("nan"), float("nan")
    num_ids = int(token_ids.max()) + 1
    map_a = majority_expert(top1_a, token_ids, num_ids, min_count)
    map_b = majority_expert(top1_b, token_ids, num_ids, min_count)
    both = (map_a >= 0) & (map_b >= 0)
    n = int(both.sum())
    if n == 0:
        return float("nan"), float("nan")
    same = int((map_a[both] == map_b[both]).sum())
    return same / n, same / (2 * n - same)


def js_divergence(p: Tensor, q: Tensor) -> float:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between two count or probability vectors."""
    p = p.to(torch.float64) / p.to(torch.float64).sum().clamp_min(1e-300)
    q = q.to(torch.float64) / q.to(torch.float64).sum().clamp_min(1e-300)
    m = (p + q) / 2
    return max(
        0.0,
        float(torch.special.entr(m).sum() - (torch.special.entr(p).sum() + torch.special.entr(q).sum()) / 2),
    )


# -- local routing consistency (#52) -------------------------------------------------------------


def window_count_histogram(active: Tensor, runs: Tensor, segment_length: int) -> Tensor:
    """For every window of `segment_length` consecutive tokens inside one run and every expert, how
    many of the window's tokens activated the expert; returns int64 [E, L + 1] counting
    (expert, window) pairs by that number. `active` bool [N, E]; `runs` [N] labels contiguous
    blocks of consecutive tokens (a sequence); windows never cross blocks. Sliding windows with
    stride 1, as in Liang et al. 2025 (moe-lrc, src/30_srp_calc.py)."""
    num_tokens, num_experts = active.shape
    length = segment_length
    hist = torch.zeros(num_experts, length + 1, dtype=torch.long)
    if num_tokens < length:
        return hist
    cumulative = torch.zeros(num_tokens + 1, num_experts, dtype=torch.int32)
    torch.cumsum(active.to(torch.int32), dim=0, out=cumulative[1:])
    starts = torch.arange(num_tokens - length + 1)
    starts = starts[runs[starts] == runs[starts + length - 1]]
    counts = (cumulative[starts + length] - cumulative[starts]).long()  # [W, E]
    index = torch.arange(num_experts) * (length + 1) + counts
    hist.view(-1).index_add_(0, index.flatten(), torch.ones(index.numel(), dtype=torch.long))
    return hist


def segment_routing_performance(histogram: Tensor, segment_length: int) -> tuple[float, int]:
    """SRP (Liang et al. 2025, "Not All Models Suit Expert Offloading", §3.1): the best F1 of a
    segment router that predicts an expert active for all L tokens of a window iff it is active for
    at least t of them. With n_c (expert, window) pairs of count c: matches(t) = Σ_{c>=t} c n_c,
    predictions(t) = L Σ_{c>=t} n_c, actual = Σ_c c n_c, F1(t) = 2 matches / (predictions + actual),
    SRP = max_t F1(t). `histogram` [..., L + 1] is summed over its leading dimensions first (per
    expert, per layer or over a whole model). Returns (SRP, the best threshold t); 1 means routing
    is constant within windows. NaN without any activation."""
    n = histogram.reshape(-1, segment_length + 1).sum(dim=0).to(torch.float64)
    c = torch.arange(segment_length + 1, dtype=torch.float64)
    matches = (c * n).flip(0).cumsum(0).flip(0)
    predictions = segment_length * n.flip(0).cumsum(0).flip(0)
    actual = matches[0]
    if float(actual) == 0:
        return float("nan"), 0
    f1 = 2 * matches / (predictions + actual)
    best = int(f1.argmax())
    return float(f1[best]), best
