"""The token-choice top-k router driven by a `RouterSpec`: each token picks its k experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.device import no_autocast
from moekit.kernels.linear import fast_linear
from moekit.kernels.topk import topk_indices
from moekit.routing.capacity import apply_capacity, expert_capacity
from moekit.routing.record import Assignments, Routing
from moekit.routing.spec import RouterSpec


def score(logits: Tensor, score_fn: str) -> Tensor:
    """The score function over the last dimension (fp32 in, fp32 out)."""
    if score_fn == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_fn == "sigmoid":
        return torch.sigmoid(logits)
    return logits


def group_limited(
    selection: Tensor, num_groups: int, topk_groups: int, group_score: str, top_k: int = 1
) -> Tensor:
    """DeepSeek-V2/V3 group-limited routing: keep the `topk_groups` best groups, mask the rest.

    A group's score is the sum of its two best selection scores (DeepSeek-V3) or its best one
    (DeepSeek-V2 "group_limited_greedy"). Experts outside the kept groups get -inf; where the kept
    groups hold fewer than `top_k` experts (transformers accepts that), they are instead moved
    below every kept expert in their own order, so the top-k takes all kept experts first and then
    the best of the rest, as transformers' -inf mask does (its ties among -inf aside).
    """
    tokens, experts = selection.shape
    grouped = selection.view(tokens, num_groups, experts // num_groups)
    if group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    kept_groups = group_scores.topk(topk_groups, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)
    if top_k > topk_groups * (experts // num_groups):
        span = selection.amax(-1, keepdim=True) - selection.amin(-1, keepdim=True) + 1
        return torch.where(expert_mask, selection, selection - span)
    return selection.masked_fill(~expert_mask, float("-inf"))


def renormalise(weights: Tensor, renorm: str, p: float, eps: float) -> Tensor:
    """Divide the chosen weights of each token by their sum or p-norm (plus eps)."""
    if renorm == "sum":
        total = weights.sum(dim=-1, keepdim=True)
    elif renorm == "pnorm":
        total = torch.linalg.vector_norm(weights, ord=p, dim=-1, keepdim=True)
    else:
        return weights
    return weights / (total + eps) if eps else weights / total  # + 0.0 changes no value


def choose_topk(
    logits: Tensor, spec: RouterSpec, selection_bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(scores [T,E], chosen expert ids [T,k] best first, their weights [T,k]) for fp32 logits."""
    scores = score(logits, spec.score_fn)
    if spec.score_timing == "before_topk":
        selection = scores if selection_bias is None else scores + selection_bias
        if spec.num_groups > 1:
            selection = group_limited(
                selection, spec.num_groups, spec.topk_groups, spec.group_score, spec.top_k
            )
        index = topk_indices(selection, spec.top_k)
        weights = scores.gather(1, index)
    else:
        selection = logits if selection_bias is None else logits + selection_bias
        index = topk_indices(selection, spec.top_k)
        weights = score(logits.gather(1, index), spec.score_fn)
    weights = renormalise(weights, spec.renorm, spec.renorm_p, spec.renorm_eps)
    if spec.scaling != 1.0:
        weights = weights * spec.scaling
    return scores, index, weights


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """Router arithmetic runs in fp32 for fp32 and lower-precision models, in float64 for float64
    (torch.promote_types with fp32, for the floating dtypes, without an op call per step)."""
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.float32
    return torch.promote_types(dtype, torch.float32)


def router_logits(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x W^T (+ b) in the router dtype, on the fast dense kernel: the router's products are as
    large as a dense layer's (2048 tokens x 512 x 64 experts on the development machine: 0.29 ms
    on oneDNN against 0.65 ms through F.linear's MKL, and about as much for each backward product)."""
    dtype = router_dtype(x.dtype)
    with no_autocast(x):  # a bf16 run's router stays fp32
        return fast_linear(_as(x, dtype), _as(weight, dtype), None if bias is None else _as(bias, dtype))


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t.to(dtype)` without an op call where it is of that dtype already (every decode step)."""
    return t if t.dtype == dtype else t.to(dtype)


class TokenChoiceRouter(nn.Module):
    """A linear router whose arithmetic runs in fp32 (or float64) whatever the model dtype.

    The selection bias (DeepSeek-V3's aux-loss-free balancing) is an fp32 buffer: it is saved with
    the model, never seen by the optimizer, and is never cast below fp32 with the module.
    """

    def __init__(self, hidden_size: int, spec: RouterSpec):
        super().__init__()
        self.spec = spec
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(spec.num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(spec.num_experts)) if spec.router_bias else None
        if spec.selection_bias:
            self.register_buffer("selection_bias", torch.zeros(spec.num_experts, dtype=torch.float32))
        else:
            self.selection_bias = None
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    @property
    def num_compute_experts(self) -> int:
        return self.spec.num_experts

    def _apply(self, fn, recurse=True):
        """Cast/move like any module, but the selection bias keeps its value and never goes below
        fp32: it takes the new device (and dtype, if at least fp32) from the cast, not the cast value."""
        original = self.selection_bias
        super()._apply(fn, recurse)
        if original is not None:
            moved = self.selection_bias
            self.selection_bias = original.to(device=moved.device, dtype=router_dtype(moved.dtype))
        return self

    def logits(self, x: Tensor) -> Tensor:
        bias = self.bias
        if self.spec.negative_bias:
            from moekit.domains.flexolmo import public_free_negative_bias

            bias = public_free_negative_bias(bias)
        return router_logits(x, self.weight, bias)

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        previous: Routing | None = None,
        generator: torch.Generator | None = None,
    ) -> Routing:
        """Route T tokens of `x` [T, d]; `token_mask` [T] marks real tokens (default: all).
        `previous` (the preceding MoE layer's routing) is not used by this router."""
        spec = self.spec
        num_tokens = x.shape[0]
        every_token = token_mask is None  # then every shape is static (what torch.compile wants)
        if token_mask is None:
            token_mask = torch.ones(num_tokens, dtype=torch.bool, device=x.device)
        logits = self.logits(x)
        selection_bias = None if self.selection_bias is None else self.selection_bias.to(logits.dtype)
        scores, index, weights = choose_topk(logits, spec, selection_bias)
        chosen = Assignments.from_dense(
            index, weights, None if every_token else token_mask, num_experts=logits.shape[1]
        )
        if spec.capacity_factor is None:
            kept, dropped = chosen, Assignments.empty(x.device)
        else:
            capacity = expert_capacity(len(chosen), spec.num_experts, spec.capacity_factor)
            kept, dropped = apply_capacity(
                chosen, num_tokens, spec.num_experts, capacity, spec.drop_policy, generator
            )
        return Routing(
            logits=logits,
            scores=scores,
            kept=kept,
            dropped=dropped,
            token_mask=token_mask,
            num_compute_experts=spec.num_experts,
        )
