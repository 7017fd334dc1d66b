"""FlexOlmo's router (Shi et al. 2025, "FlexOlmo: Open Language Models for Flexible Data Use",
§3.2-3.3; allenai/FlexOlmo `src/flexolmo/nn/moe/router.py`).

Each expert's router row is a domain embedding r_j (the mean embedding of documents of its data),
so routing needs no joint training: z = W_r x with W_r = [r_pub; r_1; ...; r_n], and the domain
experts carry a negative-only bias, z[:, 1:] += min(b, 0), so that a domain expert has to beat the
public expert (index 0) by a margin to be chosen.

Where this differs from the paper: r_j comes from an off-the-shelf embedder (GritLM-7B, whose
width equals the 7B model's) in the paper; here no such embedder exists offline and widths differ,
so r_j is the public (seed) model's own mean FFN input on domain j's documents, per layer. The bias
is learnable as in the paper (`RouterSpec.negative_bias`: the router applies
`public_free_negative_bias` to its bias parameter, so training moves b but the bias never raises a
domain expert's logit); its initial value is the recipe's `bias` (the paper does not pin one).
"""

from __future__ import annotations

import torch
from torch import Tensor


def negative_bias(bias: Tensor) -> Tensor:
    """FlexOlmo's bias on the domain experts: min(b, 0) (never favours a domain expert)."""
    return bias.clamp(max=0.0)


def public_free_negative_bias(bias: Tensor) -> Tensor:
    """The [E] bias a FlexOlmo router adds to its logits from its bias parameter b [E] (FlexOlmo
    §3.3, z[:, 1:] += min(b, 0)): 0 on the public expert 0, min(b_j, 0) on domain expert j. The
    gradient reaches b_j while b_j < 0; no value of b raises a logit."""
    return torch.cat([torch.zeros_like(bias[:1]), negative_bias(bias[1:])])


def flexolmo_router_logits(x: Tensor, rows: Tensor, bias: Tensor) -> Tensor:
    """Router logits [T, E] for inputs x [T, H], rows W_r [E, H] (row 0 the public expert) and the
    domain experts' bias b [E - 1]: z = W_r x, z[:, 1:] += min(b, 0) (FlexOlmo §3.3)."""
    logits = x @ rows.T
    return torch.cat([logits[:, :1], logits[:, 1:] + negative_bias(bias)], dim=1)


def router_bias_vector(num_domain_experts: int, bias: float) -> Tensor:
    """The [E] bias of a linear router that computes `flexolmo_router_logits`: 0 for the public
    expert, min(b, 0) for every domain expert."""
    b = negative_bias(torch.full((num_domain_experts,), float(bias), dtype=torch.float64))
    return torch.cat([torch.zeros(1, dtype=torch.float64), b])


def domain_embedding_rows(domain_means: Tensor) -> Tensor:
    """Router rows [1 + D, H] from per-domain mean embeddings [D, H]: each domain's mean,
    normalised, and for the public expert the normalised mean over all domains (its data is
    everyone's, FlexOlmo's public mix)."""
    public = domain_means.mean(0, keepdim=True)
    return torch.nn.functional.normalize(torch.cat([public, domain_means]), dim=-1)
