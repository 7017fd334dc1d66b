"""HDEE's ensemble of domain experts (Gensyn 2025, "HDEE: Heterogeneous Domain Expert Ensemble";
the Branch-Train-Merge posterior of Li et al. 2022, eq. 2-3; gensyn-ai/hdee `eval_ensemble.py`).

    p(x_t | x_<t) = sum_j P(D=j | x_<t) p_j(x_t | x_<t)
    P(D=j | x_<t) ∝ prior_j * prod_{s<t} p_j(x_s | x_<s)

i.e. a softmax over experts of (log prior + each expert's cumulative log-likelihood of the
document so far). The posterior restarts at every document (packed rows hold several). The prior
here is uniform (HDEE's alternative to its cached prior estimated on dev sequences).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.data.batch import IGNORE_INDEX, Batch


def cumulative_within_documents(values: Tensor, doc_ids: Tensor) -> Tensor:
    """Exclusive cumulative sum of `values` [..., B, S] along S, restarted at every document of
    `doc_ids` [B, S]: position t holds the sum over the earlier positions of its own document."""
    inclusive = values.cumsum(-1)
    exclusive = inclusive - values
    s = doc_ids.shape[-1]
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    position = torch.arange(s, device=doc_ids.device).expand_as(doc_ids)
    start_of = torch.where(starts, position, torch.zeros_like(position)).cummax(-1).values
    return exclusive - exclusive.gather(-1, start_of.expand_as(exclusive))


def hdee_posterior_log_weights(
    token_logprobs: Tensor, doc_ids: Tensor, log_prior: Tensor | None = None
) -> Tensor:
    """log P(D=j | x_<t) [N, B, S] from each expert's log p_j(x_t | x_<t) [N, B, S] (0 where a
    position has no target) and the log prior [N] (uniform when None): BTM eq. 3."""
    n = token_logprobs.shape[0]
    if log_prior is None:
        log_prior = torch.full((n,), -torch.log(torch.tensor(float(n))).item(), dtype=token_logprobs.dtype)
    scores = cumulative_within_documents(token_logprobs, doc_ids) + log_prior.view(n, 1, 1)
    return scores.log_softmax(0)


def hdee_ensemble_nll(token_logprobs: Tensor, doc_ids: Tensor, log_prior: Tensor | None = None) -> Tensor:
    """-log sum_j P(D=j | x_<t) p_j(x_t | x_<t) [B, S] (BTM eq. 2)."""
    log_w = hdee_posterior_log_weights(token_logprobs, doc_ids, log_prior)
    return -(log_w + token_logprobs).logsumexp(0)


def target_logprobs(logits: Tensor, batch: Batch) -> Tensor:
    """log p(target) [B, S] in float64, 0 where there is no target."""
    targets = batch.targets
    valid = targets != IGNORE_INDEX
    logp = F.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


@torch.no_grad()
def ensemble_nll_fn(models: Sequence[torch.nn.Module]):
    """A batch -> per-token NLL [B, S] function of the posterior-weighted ensemble of `models`."""
    from moekit.train.methods import run_model

    def nll(batch: Batch) -> Tensor:
        logprobs = torch.stack([target_logprobs(run_model(m, batch).logits, batch) for m in models])
        out = hdee_ensemble_nll(logprobs, batch.doc_ids)
        return torch.where(batch.targets != IGNORE_INDEX, out, torch.zeros_like(out))

    return nll
