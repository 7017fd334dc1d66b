"""Per-domain validation loss of anything that scores tokens: a model, an ensemble, an MoE with an
expert removed. One pass over each domain's validation documents, the same batches for every
candidate, so their losses compare token for token."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.data.batch import IGNORE_INDEX, Batch
from moekit.data.lmdata import LanguageModelData

TokenNll = Callable[[Batch], Tensor]  # batch -> NLL [B, S], 0 where there is no target


def model_nll(model: torch.nn.Module) -> TokenNll:
    from moekit.train.methods import run_model

    def nll(batch: Batch) -> Tensor:
        logits = run_model(model, batch).logits
        return F.cross_entropy(
            logits.double().transpose(1, 2), batch.targets, ignore_index=IGNORE_INDEX, reduction="none"
        )

    return nll


@torch.no_grad()
def domain_losses(
    nll: TokenNll,
    data: LanguageModelData,
    domains: Sequence[str],
    *,
    seq_len: int,
    batch_size: int = 4,
    max_batches: int = 4,
    split: str = "validation",
) -> dict[str, float]:
    """Mean NLL (nats per token) per domain and their unweighted mean as `mean`."""
    out: dict[str, float] = {}
    for domain in domains:
        total, count = 0.0, 0
        for index, batch in enumerate(
            data.eval_batches(domain, split, batch_size=batch_size, seq_len=seq_len)
        ):
            if index >= max_batches:
                break
            total += float(nll(batch).sum())
            count += batch.num_targets
        out[domain] = total / max(count, 1)
    out["mean"] = sum(out[d] for d in domains) / len(domains)
    return out
