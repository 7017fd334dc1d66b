"""Expert compute that `torch.compile` can trace whole (`fullgraph=True`): static shapes, no host reads.

The grouped path (`dispatch/grouped.py`) plans on the host: it reads the per-expert row counts,
hands the experts to C++ loops on torch's threads and runs them through a custom autograd
function, none of which a compiled graph can hold. Under compile the experts run here instead,
as plain differentiable tensor ops that the compiler fuses and differentiates itself.

Every expert runs over every token, weighted by the routing's dense [T, E] weights (zero where a
token did not pick the expert): E/k times the grouped path's products, but with static shapes and
no data-dependent control flow. That is the trade HF's own compiled `batched_mm` path also makes
on the CPU, where the compile-time `grouped_mm` kernel takes bf16 only. It suits what compiled
MoE inference on a CPU is used for: decoding with a static KV cache, a few tokens per step.
With fewer assignments than experts (decoding), each assignment instead gathers its own expert's
weights and runs as one batched product, so that only the chosen experts' weights are read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from moekit.experts.activations import Activation


def dense_routing_weights(
    token: Tensor, expert: Tensor, weight: Tensor, num_tokens: int, num_experts: int
) -> Tensor:
    """The assignments' weights as [T, E] (zero elsewhere; repeated pairs add up), differentiable
    with respect to `weight`; assignments to experts >= num_experts (null experts) are left out."""
    full = max(num_experts, 1)
    dense = weight.new_zeros(num_tokens, full + 1)
    # null experts (ids >= num_experts) land in one spare column that is cut off
    column = expert.clamp(max=full)
    dense = dense.index_put((token, column), weight, accumulate=True)
    return dense[:, :num_experts]


def compiled_experts(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    weight: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: Activation,
    weight_on: str = "output",
) -> Tensor:
    """y[t] = sum over assignments (t, e, w) of w * expert_e(x[t]) (or expert_e(w * x[t])), for
    packed `w_in` [E, in, d], `w_out` [E, d, ff]; the same sum as `grouped_experts`."""
    num_experts = w_in.shape[0]
    # a data-dependent number of assignments (a token mask) takes the dense form, which needs no guard
    if guard_or_false(token.shape[0] < num_experts):
        return _gathered_experts(x, token, expert, weight, w_in, w_out, b_in, b_out, activation, weight_on)
    dense = dense_routing_weights(token, expert, weight, x.shape[0], num_experts).to(x.dtype)  # [T, E]
    scale = dense.t().unsqueeze(-1)  # [E, T, 1]
    inputs = x.unsqueeze(0) * scale if weight_on == "input" else x.unsqueeze(0).expand(num_experts, -1, -1)
    h = torch.matmul(inputs, w_in.transpose(1, 2))  # [E, T, in]
    if b_in is not None:
        h = h + b_in.unsqueeze(1)
    a = activation.forward(h)
    y = torch.matmul(a, w_out.transpose(1, 2))  # [E, T, d]
    if b_out is not None:
        y = y + b_out.unsqueeze(1)
    if weight_on == "output":
        return (y * scale).sum(0)
    if b_in is None and b_out is None:  # an expert a token did not pick sees a zero row: output 0
        return y.sum(0)
    # with biases that zero row still gives an output: keep picked (token, expert) pairs only
    ones = torch.ones_like(weight, dtype=x.dtype)
    picked = dense_routing_weights(token, expert, ones, x.shape[0], num_experts) > 0
    return torch.where(picked.t().unsqueeze(-1), y, torch.zeros_like(y)).sum(0)


def _gathered_experts(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    weight: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: Activation,
    weight_on: str,
) -> Tensor:
    """`compiled_experts` for a few assignments: one row per assignment against its expert's
    gathered weights ([A, in, d] and [A, d, ff], batched products); null experts contribute 0."""
    num_experts = w_in.shape[0]
    real = expert < num_experts
    chosen = expert.clamp(max=num_experts - 1)
    scale = torch.where(real, weight, torch.zeros_like(weight)).to(x.dtype).unsqueeze(1)  # [A, 1]
    w_in_rows, w_out_rows = w_in.index_select(0, chosen), w_out.index_select(0, chosen)
    return summed_expert_rows(
        x, token, chosen, scale, b_in, b_out, activation, weight_on,
        lambda rows: torch.bmm(w_in_rows, rows.unsqueeze(-1)).squeeze(-1),  # [A, in]
        lambda a: torch.bmm(w_out_rows, a.unsqueeze(-1)).squeeze(-1),  # [A, d]
        keep=real,
    )  # fmt: skip


def summed_expert_rows(
    x: Tensor,
    token: Tensor,
    expert: Tensor,
    scale: Tensor,
    b_in: Tensor | None,
    b_out: Tensor | None,
    activation: Activation,
    weight_on: str,
    product_in: Callable[[Tensor], Tensor],
    product_out: Callable[[Tensor], Tensor],
    keep: Tensor | None = None,
) -> Tensor:
    """y[t] = sum over assignments (t, e, w) of w * expert_e(x[t]) (or expert_e(w * x[t])) for
    routing weights `scale` [A, 1] and each assignment's products with its expert's weights
    (`product_in`, `product_out`), in the grouped path's order of arithmetic (the weight on the
    activation before the output product); `keep` [A]: the assignments that count (None: all)."""
    rows = x.index_select(0, token)
    if weight_on == "input":
        rows = rows * scale
    h = product_in(rows)
    if b_in is not None:
        h = h + b_in.index_select(0, expert)
    a = activation.forward(h)
    if weight_on == "output":
        a = a * scale
    y = product_out(a)
    if b_out is not None:
        bias_rows = b_out.index_select(0, expert)
        y = y + (bias_rows * scale if weight_on == "output" else bias_rows)
    if keep is not None:
        y = torch.where(keep.unsqueeze(1), y, torch.zeros_like(y))
    return torch.zeros_like(x).index_add(0, token, y)
