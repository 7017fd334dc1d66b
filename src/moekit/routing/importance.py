"""Token importance for online dynamic pruning (MC-MoE #38, ODP, §3.3): which tokens of a sequence
may skip their routed experts, and which are protected from any pruning.

MC-MoE scores token j of a prefilled sequence by the attention it receives, averaged over the
heads and over the positions that attend to it, times the L1 norm of its MoE-layer input:

    s_j = ‖x_j‖₁ · (1 / |{i : i attends j}|) · Σ_i Ā_ij        (Ā: head-mean attention probabilities)

and, per sequence, lets the int(τ_l·n) least important tokens skip their routed experts and keeps
the routing of the int(τ_h·n) most important ones whatever the other pruning rules say.

Two kinds of importance, chosen per override (`RoutingOverride.importance`):
- `attention`: the rule above, from the attention probabilities of the MoE layer's own block.
  The attention paths compute them only when an override asks (`attention_received`), by one
  extra softmax(q kᵀ) over the prefill, since the fused kernels (SDPA) never materialise them.
- `position`: ‖x_j‖₁ / |{i : i attends j}|, what MC-MoE's released code computes (its sum of each
  query row of the softmax is 1, so only the count of attending positions is left). It needs no
  attention probabilities, so it is also the proxy for attention paths that give none (moekit's
  attention experts, MoA): documented, and selectable everywhere so the two can be compared.

Importance is a prefill notion: a decoding step's single new token has received no attention
yet, so, as in MC-MoE's code, one-token steps are left to the weight-ratio rule alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

IMPORTANCE_KINDS = ("attention", "position")
# where the MoE layer puts each token's importance in its `Routing.extras` (float [T])
IMPORTANCE_KEY = "token_importance"


def attention_received(
    q: Tensor, k: Tensor, scale: float, mask: Tensor | None = None, sinks: Tensor | None = None
) -> Tensor | None:
    """Mean attention each of the S current tokens receives: [B, S], fp32.

    `q` [B, H, S, D], `k` [B, KV, L, D] (L >= S: cached keys first, the current tokens last);
    `mask` bool [B or 1, 1, S, L] (True = attend) or None for plain causal attention; `sinks`
    [H]: per-head logits that join each softmax and are dropped after (GPT-OSS). The probabilities
    are averaged over heads, summed over the queries, and divided by the number of queries that
    may attend to the key. None when the keys do not end with the current tokens (L < S)."""
    b, h, s, _ = q.shape
    length = k.shape[2]
    if length < s:
        return None
    groups = h // k.shape[1]
    keys = k.float().repeat_interleave(groups, dim=1) if groups > 1 else k.float()
    scores = torch.matmul(q.float(), keys.transpose(-1, -2)) * scale
    if mask is None:
        allowed = torch.ones(s, length, dtype=torch.bool, device=q.device).tril(diagonal=length - s)
        allowed = allowed[None, None]
    else:
        allowed = mask.to(torch.bool)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(b, h, s, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    received = probs.nan_to_num(0.0).mean(dim=1).sum(dim=1)  # [B, L]
    attending = allowed.expand(b, 1, s, length)[:, 0].sum(dim=1)  # [B, L]
    return (received / attending.clamp_min(1))[:, length - s :]


def attending_positions(token_mask: Tensor) -> Tensor:
    """[B, S] count of real tokens at or after each position of its row (causal attention: the
    queries that attend to it); padding positions get 0."""
    real = token_mask.to(torch.long)
    return (real.flip(-1).cumsum(-1).flip(-1)) * real


def mc_moe_importance(hidden: Tensor, received: Tensor) -> Tensor:
    """MC-MoE (#38, §3.3) token importance s_j = ‖x_j‖₁ · mean attention received by j.

    `hidden` [..., d] the MoE layer's input, `received` [...] from `attention_received`."""
    return hidden.float().abs().sum(-1) * received.float()


def released_importance(hidden: Tensor, token_mask: Tensor) -> Tensor:
    """MC-MoE's released ODP code's importance, ‖x_j‖₁ / (positions attending to j): its
    row-sum of each query's attention probabilities is 1, so only the count is left.

    `hidden` [B, S, d], `token_mask` [B, S] bool."""
    count = attending_positions(token_mask).clamp_min(1)
    return hidden.float().abs().sum(-1) / count


def importance_split(
    importance: Tensor,
    token_mask: Tensor,
    skip_fraction: float,
    protect_fraction: float,
    spare_last_token: bool = True,
) -> tuple[Tensor, Tensor]:
    """(skip, protect) bool [B, S]: per row of n real tokens, the int(skip_fraction·n) least
    important and the int(protect_fraction·n) most important (MC-MoE's τ_l and τ_h); a token in
    both is protected, as in MC-MoE's code. Padding is in neither.

    `spare_last_token`: the last real token of a row is never among the skipped (the next least
    important one is). Its output is the distribution of the first generated token; the paper
    scores perplexity, where no position is special, and leaves this open. With the attention
    score the last token is the one most likely to be skipped, since only it attends to itself."""
    real = token_mask.to(torch.bool)
    skip = torch.zeros_like(real)
    protect = torch.zeros_like(real)
    counts = real.sum(-1).tolist()
    positions = torch.arange(real.shape[-1], device=real.device)
    for row, n in enumerate(counts):
        low, high = int(skip_fraction * n), int(protect_fraction * n)
        if spare_last_token:
            low = min(low, n - 1)
        if not (low or high):
            continue
        values = importance[row].float()
        if low:
            skippable = real[row]
            if spare_last_token:
                skippable = skippable & (positions != positions.masked_fill(~real[row], -1).max())
            order = values.masked_fill(~skippable, float("inf")).argsort(stable=True)
            skip[row, order[:low]] = True
        if high:
            order = values.masked_fill(~real[row], float("-inf")).argsort(descending=True, stable=True)
            protect[row, order[:high]] = True
    return skip & ~protect, protect
