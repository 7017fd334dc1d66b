"""The research routers' own objectives, each a small pure function naming its paper.

All take a `Routing` (or model outputs) and return an unweighted scalar over the real tokens; the
caller multiplies by its coefficient. They are single-batch formulas: for objectives whose scope
matters (micro-batch vs global batch) use `moekit.balance`, which already covers two of them
(its `entropy` objective is #9's dynamic loss; its `load_balance` objective is AdaMoE's null-aware
LBL whenever the routing has null experts).

How the trainer uses the ones that need more than a `Routing`:

- THOR (#33): run the model twice on the same batch in train mode (the two passes draw experts
  independently), and minimise CE(logits_a) + CE(logits_b) + alpha * thor_consistency_loss(logits_a,
  logits_b, targets != IGNORE_INDEX), alpha = 1 in the released code.
- LoRAMoE (#36): pass the batch's per-token type labels (`Batch.domains` mapped to expert groups,
  e.g. 0 for "world knowledge" domains and 1 for the rest) with `sequence_index(...)` as samples.
- EvoMoE (#51): call `set_dts_step(model, step, total_steps)` before every step (its schedule is
  `moekit.routing.dense_to_sparse.dts_temperature`); its auxiliary loss is `evomoe_balance_loss`.
- SMoRA (#47): the token-choice router with `selection_bias: true` and a bias update rate in
  `BalanceConfig`; `moekit.balance.apply_bias_updates` is its load-balancing bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.balance.objectives import routing_entropy_per_token, switch_load_balancing_loss
from moekit.balance.stats import routing_probabilities
from moekit.errors import MoekitError
from moekit.routing.record import Routing
from moekit.routing.selection import dense_weights


def _real(routing: Routing) -> Tensor:
    return routing.token_mask.to(torch.bool)


def top_p_entropy_loss(routing: Routing) -> Tensor:
    """Huang et al. 2024 (#9), the dynamic loss L_dyn = -(1/T) sum_t sum_i p_{t,i} log p_{t,i}.

    Minimising the routing entropy keeps top-p from meeting its threshold by flattening p over
    many experts (without it the mean number of experts drifts up toward ceil(p E))."""
    probs = routing_probabilities(routing)[_real(routing)]
    if probs.shape[0] == 0:
        return probs.sum() * 0
    return routing_entropy_per_token(probs).mean()


def null_aware_load_balancing_loss(routing: Routing) -> Tensor:
    """AdaMoE (#34), the null-aware LBL of the released exp_1 code: the Switch loss
    E' sum_i f_i P_i over all E' = E + m experts, with the null experts' slot fractions replaced by
    their mean (`expert_mask[E:] = mean(expert_mask[E:])`): nulls are interchangeable, so the loss
    steers how much null capacity is used in total without balancing nulls against each other."""
    real = _real(routing)
    probs = routing_probabilities(routing)[real]
    return switch_load_balancing_loss(
        routing.chosen_counts, probs.sum(0), int(real.sum()), routing.num_compute_experts
    )


def evomoe_balance_loss(routing: Routing) -> Tensor:
    """EvoMoE (#51) auxiliary loss of the released `topkgate.py`: l_aux = E^2 * mean_i(me_i * ce_i),
    me_i the mean gate probability of expert i and ce_i the fraction of tokens that selected it
    (a token may select several experts under the dense-to-sparse gate)."""
    real = _real(routing)
    num_tokens = int(real.sum())
    probs = routing_probabilities(routing)[real]
    if num_tokens == 0:
        return probs.sum() * 0
    me = probs.mean(0)
    ce = routing.chosen_counts.to(probs.dtype) / num_tokens
    return routing.num_experts**2 * (me * ce).mean()


def thor_consistency_loss(logits_a: Tensor, logits_b: Tensor, mask: Tensor | None = None) -> Tensor:
    """THOR (#33) consistency regulariser between two forward passes with independently drawn experts:
    1/2 [KL(p_a || p_b) + KL(p_b || p_a)] of the output token distributions, averaged over the
    positions where `mask` is true (non-padding, or tokens with a target). `logits_*` [..., V]."""
    if logits_a.shape != logits_b.shape:
        raise MoekitError(f"THOR: logits shapes differ, {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    log_a = F.log_softmax(logits_a.float(), dim=-1)
    log_b = F.log_softmax(logits_b.float(), dim=-1)
    per_position = 0.5 * ((log_a.exp() * (log_a - log_b)).sum(-1) + (log_b.exp() * (log_b - log_a)).sum(-1))
    if mask is None:
        return per_position.mean()
    mask = mask.to(torch.bool)
    if mask.shape != per_position.shape:
        raise MoekitError(f"THOR: mask shape {tuple(mask.shape)}, expected {tuple(per_position.shape)}")
    if not bool(mask.any()):
        return per_position.sum() * 0
    return per_position[mask].mean()


def loramoe_localized_balance_loss(
    routing: Routing,
    token_types: Tensor,
    delta: float,
    sample_index: Tensor | None = None,
    num_groups: int = 2,
    toward_matching: bool = False,
) -> Tensor:
    """LoRAMoE (#36) localised balancing constraint, as in the released `peft/tuners/lora.py`:

        Q_{n,e} = sum over sample n's tokens of w_{t,e}  (the expert's importance for the sample)
        I_{n,e} = 1 + delta if expert e's group is sample n's type, else 1 - delta
        L_lbc = CV^2(Q * I) = Var(Q * I) / Mean(Q * I)^2 over all (n, e)

    The experts are split into `num_groups` contiguous groups (two halves in the paper); a sample's
    type is its group. `token_types` [T] (int, the group of each token's sample; ignored on padding);
    `sample_index` [T] numbers the samples (e.g. `moekit.balance.sequence_index`; default: each
    token is its own sample). Balanced within a group, the constraint lets each group specialise.
    Taken alone, CV^2(Q * I) is zero exactly when Q is proportional to 1 / I (the matching group at
    (1 - delta) / (1 + delta) of the other's importance); the formula is implemented as published.
    That is the opposite of the paper's stated intent (the matching group should take more of a
    sample's weight): `toward_matching=True` uses CV^2(Q / I) instead, zero when Q is proportional
    to I (the matching group at (1 + delta) / (1 - delta) of the other's importance).
    """
    num_experts = routing.num_compute_experts
    if num_experts % num_groups:
        raise MoekitError(f"LoRAMoE constraint: {num_experts} experts do not split into {num_groups} groups")
    real = _real(routing)
    types = token_types.reshape(-1).to(torch.long)
    if types.shape[0] != routing.num_tokens:
        raise MoekitError(
            f"LoRAMoE constraint: expected {routing.num_tokens} token types, got {types.shape[0]}"
        )
    if bool(((types[real] < 0) | (types[real] >= num_groups)).any()):
        raise MoekitError(f"LoRAMoE constraint: token types must lie in [0, {num_groups}) on real tokens")
    if sample_index is None:
        sample_index = torch.arange(routing.num_tokens, device=types.device)
    samples = sample_index.reshape(-1).to(torch.long)
    weights = dense_weights(routing.compute_assignments, routing.num_tokens, num_experts)[real]
    samples, types = samples[real], types[real]
    if samples.numel() == 0:
        return weights.sum() * 0
    unique, samples = torch.unique(samples, return_inverse=True)
    sample_type = torch.full((unique.numel(),), -1, dtype=torch.long, device=types.device)
    sample_type.scatter_(0, samples, types)
    if not torch.equal(sample_type[samples], types):
        raise MoekitError("LoRAMoE constraint: every token of a sample must carry the sample's type")
    importance = weights.new_zeros(unique.numel(), num_experts).index_add(0, samples, weights)
    expert_group = torch.arange(num_experts, device=types.device) // (num_experts // num_groups)
    matches = expert_group.unsqueeze(0) == sample_type.unsqueeze(1)
    coefficient = torch.where(matches, 1.0 + delta, 1.0 - delta).to(importance.dtype)
    weighted = importance / coefficient if toward_matching else importance * coefficient
    return weighted.var(unbiased=False) / weighted.mean().square().clamp_min(torch.finfo(weighted.dtype).tiny)


def routing_contrastive_loss(routing: Routing) -> Tensor:
    """ProMoE (#18) routing contrastive loss, InfoNCE over the experts' prototypes [recon: the paper's
    exact form is not published]: -log softmax(z_t)[e_t] averaged over real tokens, where z are the
    cosine router's logits cos(phi(x), c_i) / tau and e_t the token's top expert. It pulls each token
    toward its assigned prototype and pushes it from the others."""
    top = routing.top1_expert()
    keep = _real(routing) & (top >= 0)
    if not bool(keep.any()):
        return routing.logits.sum() * 0
    return F.cross_entropy(routing.logits[keep], top[keep])
