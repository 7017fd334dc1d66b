"""SCMoE: greedy decoding on the contrast between a model's strong and weak routing.

Shi et al. 2024, "Unchosen Experts Can Contribute Too: Unleashing MoE Models' Power by
Self-Contrast" (SCMoE): each decoding step runs the same model twice, once with its own top-k
routing (strong) and once with weaker routing: fewer experts per token (`weak_top_k`, e.g. top-1
of a top-2 model) or the paper's rank-k routing (`weak_ranks`, e.g. [2]: only each token's
third-ranked expert, weights renormalised by the router's rule), and picks the argmax of the
plausibility-masked contrast.
Each pass keeps its own KV cache, so the cost is two forward passes per step. Like `generate`, a
row ends at `eos_token_id` (later tokens are the pad token) and decoding stops when every row has
ended: without it, text after the end of an answer would run into the answer when decoded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, require_int, require_number
from moekit.inference.generate import _check_inputs, _forward, _model_kind
from moekit.inference.methods.common import positions_of
from moekit.inference.methods.cost import MethodCost
from moekit.routing.override import Overrides, RoutingCapture, RoutingOverride, override_routing


def self_contrast_logits(strong: Tensor, weak: Tensor, beta: float, alpha: float) -> Tensor:
    """SCMoE's decoding score (Shi et al. 2024, §3, with the adaptive plausibility constraint of
    contrastive decoding, Li et al. 2023, eq. 3):

        s = (1 + β)·z_strong − β·z_weak   where z_strong ≥ log α + max z_strong, else −inf.

    The constraint keeps tokens whose strong probability is at least α times the most probable
    one's, so β = 0 leaves the strong argmax unchanged."""
    cutoff = math.log(alpha) + strong.max(dim=-1, keepdim=True).values
    contrast = (1.0 + beta) * strong - beta * weak
    return contrast.masked_fill(strong < cutoff, float("-inf"))


@dataclass
class SCMoEResult:
    tokens: Tensor  # prompt + generated tokens [B, S + new]
    cost: MethodCost = field(default_factory=MethodCost)


def _count(capture: RoutingCapture) -> int:
    total = sum(int(r.kept.token.numel()) for records in capture.routings.values() for r in records)
    capture.clear()
    return total


@torch.no_grad()
def scmoe_generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 16,
    beta: float = 0.5,
    alpha: float = 0.1,
    weak_top_k: int = 1,
    weak_ranks: Sequence[int] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> SCMoEResult:
    """Greedy SCMoE decoding of left-padded prompts (defaults α = 0.1, β = 0.5 as in the paper)."""
    require_number("beta", beta, minimum=0.0)
    require_number("alpha", alpha, minimum=0.0, strict=True)
    if alpha > 1.0:
        raise ConfigError("alpha", f"got {alpha}, expected a number in (0, 1]")
    require_int("weak_top_k", weak_top_k, minimum=0)
    kind = _model_kind(model)
    real = _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    was_training = model.training
    model.eval()
    cost = MethodCost()
    capture = RoutingCapture()
    strong_overrides = Overrides(capture=capture)
    weak = (
        RoutingOverride(ranks=list(weak_ranks))
        if weak_ranks is not None
        else RoutingOverride(top_k=weak_top_k)
    )
    weak_overrides = Overrides(default=weak, capture=capture)
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos = torch.tensor([int(i) for i in eos_ids], dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    try:
        caches = (model.new_cache(), model.new_cache())
        ids, step_real, positions = input_ids.long(), real, positions_of(real)
        tokens = []
        for _ in range(max_new_tokens):
            with override_routing(model, strong_overrides):
                strong = _forward(model, kind, ids, step_real, positions, caches[0])
            with override_routing(model, weak_overrides):
                weak = _forward(model, kind, ids, step_real, positions, caches[1])
            cost.forward_passes += 2
            cost.assignments += _count(capture)
            token = self_contrast_logits(strong, weak, beta, alpha).argmax(dim=-1)
            if len(eos):
                token = torch.where(finished, torch.full_like(token, pad), token)
            tokens.append(token)
            if len(eos):
                finished |= torch.isin(token, eos)
                if bool(finished.all()):
                    break
            positions = positions[:, -1:] + 1
            ids = token[:, None]
            step_real = torch.ones_like(ids, dtype=torch.bool)
    finally:
        model.train(was_training)
    new = torch.stack(tokens, dim=1) if tokens else input_ids[:, :0].long()
    return SCMoEResult(torch.cat([input_ids.long(), new], dim=1), cost)
