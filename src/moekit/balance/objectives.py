"""Balancing and router objectives as small pure functions of explicit statistics.

Each function computes one paper's formula from sums (per-expert assignment counts, sums of
routing probabilities, token counts) rather than from a batch, so the *scope* of the statistics
(micro-batch, sequence, global batch) is decided by the caller (`moekit.balance.step`) and the
formula never changes with it. The coefficient (α) is applied by the caller too.

Conventions, shared by every load-balancing formula here:

- **Top-k counts.** f_i is the fraction of the routing slots sent to expert i: a batch of T tokens
  routed top-k has T·k slots, and f_i = c_i / Σ_j c_j with c_i the number of (token, expert) choices
  of expert i. So Σ_i f_i = 1 and E·Σ_i f_i P_i is 1 under uniform routing, whatever k is. (HF
  transformers' `load_balancing_loss_func` divides the counts by T instead of T·k, so its value is
  k times this one; Tutel's `gshard_loss` counts only the top-1 choice.)
- **Before capacity.** c_i counts the assignments the router *chose*, kept or dropped by capacity:
  computing f after the capacity mask underestimates the imbalance exactly when it is worst
  (Megatron-LM#1513). Padding tokens have no assignments and are never counted.
- **Probabilities.** P_i averages p_{t,i}, the router's scores over *all* experts normalised to sum
  to one per token: the softmax itself for softmax routers, DeepSeek-V3's s'_{i,t} = s_{i,t}/Σ_j s_{j,t}
  for sigmoid routers (see `moekit.balance.stats.routing_probabilities`).
- **Null experts** (ids ≥ `num_compute_experts`, AdaMoE #34) are part of the distribution: E counts
  them, and their f is replaced by the mean f over the null experts, so the loss steers how much
  null capacity is used in total without balancing interchangeable nulls against each other
  (AdaMoE's null-aware LBL).
- **Counts carry no gradient**; the gradient flows through P only (as in every reference).
"""

from __future__ import annotations

import torch
from torch import Tensor


def slot_fractions(counts: Tensor, dtype: torch.dtype, num_compute_experts: int | None = None) -> Tensor:
    """f_i = c_i / Σ_j c_j over the last dimension (the top-k slot fraction), null experts sharing
    their mean; all zeros where nothing was routed. `counts` [..., E] int64, no gradient."""
    counts = counts.detach()
    fractions = counts.to(dtype) / counts.sum(-1, keepdim=True).clamp(min=1).to(dtype)
    if num_compute_experts is not None and num_compute_experts < counts.shape[-1]:
        nulls = fractions[..., num_compute_experts:]
        null_mean = nulls.mean(-1, keepdim=True).expand_as(nulls)
        fractions = torch.cat([fractions[..., :num_compute_experts], null_mean], -1)
    return fractions


def switch_load_balancing_loss(
    counts: Tensor, prob_sums: Tensor, num_tokens: int | Tensor, num_compute_experts: int | None = None
) -> Tensor:
    """Switch Transformer (Fedus et al. 2022, eq. 4-6) / GShard auxiliary loss with top-k counts:

        L = E · Σ_i f_i · P_i,  f_i = c_i / Σ_j c_j,  P_i = (1/T) Σ_t p_{t,i}

    over one batch of `num_tokens` real tokens. `counts` [E] int64, `prob_sums` [E] = Σ_t p_{t,i}.
    """
    num_experts = counts.shape[-1]
    if int(num_tokens) == 0:
        return prob_sums.sum() * 0
    fractions = slot_fractions(counts, prob_sums.dtype, num_compute_experts)
    return num_experts * (fractions * prob_sums).sum() / num_tokens


def deepseek_sequence_aux_loss(
    seq_counts: Tensor,
    seq_prob_sums: Tensor,
    seq_num_tokens: Tensor,
    num_sequences: int,
    num_compute_experts: int | None = None,
) -> Tensor:
    """DeepSeek-V3 (2024) complementary sequence-wise balance loss, eq. 17-20, averaged over sequences:

        L_seq = Σ_i f_i P_i,  f_i = N_r/(K_r T) Σ_t 1(token t selects i),  P_i = (1/T) Σ_t s'_{i,t}

    per sequence of T real tokens (a document in a packed row), α applied by the caller. K_r·T is
    the sequence's number of routing slots Σ_j c_j, so N_r Σ_i f_i P_i is the Switch formula on one
    sequence. `seq_counts`/`seq_prob_sums` [S, E] and `seq_num_tokens` [S] hold this batch's S
    sequences; the result is their sum divided by `num_sequences`, the number of sequences in the
    whole global batch, so that the contributions of all micro-batches and ranks add up to the mean.
    """
    num_experts = seq_counts.shape[-1]
    if seq_counts.shape[0] == 0:
        return seq_prob_sums.sum() * 0
    fractions = slot_fractions(seq_counts, seq_prob_sums.dtype, num_compute_experts)
    means = seq_prob_sums / seq_num_tokens.to(seq_prob_sums.dtype).unsqueeze(-1)
    per_sequence = num_experts * (fractions * means).sum(-1)
    return per_sequence.sum() / num_sequences


def global_batch_load_balancing_loss(
    global_counts: Tensor,
    prob_sums: Tensor,
    global_num_tokens: int | Tensor,
    num_compute_experts: int | None = None,
) -> Tensor:
    """Global-batch LBL ("Demons in the Detail", Qiu et al. 2025, #53): L = N_E Σ_i f_i P_i with f_i
    from the counts of the *whole global batch* (every gradient-accumulation micro-batch and every
    data-parallel rank, all-reduced, no gradient) and P_i = (1/N_global) Σ_t p_{t,i}.

    Once f is fixed the loss is linear in P, so `prob_sums` may be one micro-batch's share: the
    shares of all micro-batches and ranks add up to the global loss and its gradient exactly.
    """
    return switch_load_balancing_loss(global_counts, prob_sums, global_num_tokens, num_compute_experts)


def router_z_per_token(logits: Tensor) -> Tensor:
    """ST-MoE (Zoph et al. 2022, eq. 5) z-loss summand for each token: (log Σ_i exp z_{t,i})², [T]."""
    return torch.logsumexp(logits, dim=-1).square()


def router_z_loss(z_sum: Tensor, num_tokens: int | Tensor) -> Tensor:
    """ST-MoE router z-loss L_z = (1/T) Σ_t (logsumexp_i z_{t,i})², from the sum over T real tokens
    (or element-wise, from per-sequence sums and token counts).

    It keeps router logits small so the fp32 softmax stays well conditioned; `num_tokens` is the
    normaliser of the chosen scope (the global real-token count for the global scope).
    """
    return _token_mean(z_sum, num_tokens)


def routing_entropy_per_token(probs: Tensor) -> Tensor:
    """Shannon entropy −Σ_i p_{t,i} log p_{t,i} of each token's routing distribution (nats), [T]."""
    return torch.special.entr(probs).sum(-1)


def routing_entropy_loss(entropy_sum: Tensor, num_tokens: int | Tensor) -> Tensor:
    """Dynamic routing (Huang et al. 2024, "Harder Tasks Need More Experts", #9): the dynamic loss
    L_dyn = −(1/T) Σ_t Σ_i p_{t,i} log p_{t,i}, the mean token entropy of the routing distribution.

    Minimising it sharpens each token's distribution, so top-p routing cannot satisfy its threshold
    by flattening p over many experts. Computed from the entropy sum over T real tokens (or
    element-wise, from per-sequence sums and token counts).
    """
    return _token_mean(entropy_sum, num_tokens)


def _token_mean(total: Tensor, num_tokens: int | Tensor) -> Tensor:
    """total / num_tokens (element-wise for per-sequence tensors); 0 for an empty batch."""
    if isinstance(num_tokens, Tensor):
        return total / num_tokens.to(total.dtype)
    return total * 0 if num_tokens == 0 else total / num_tokens
