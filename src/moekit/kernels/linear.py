"""A linear layer whose three products (forward, input gradient, weight gradient) go through
`moekit.kernels.gemm`, so dense layers run on the same fast kernel as the experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.device import autocast_dtype
from moekit.kernels.gemm import dense_onednn_pays_off, dense_weight_grad, linear


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = linear(flat, weight)
        if bias is not None:
            out += bias
        ctx.save_for_backward(flat, weight)
        ctx.has_bias = bias is not None
        ctx.shape = x.shape
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        flat, weight = ctx.saved_tensors
        grad = grad_out.contiguous().reshape(-1, weight.shape[0])
        grad_x = linear(grad, weight.t()).reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        grad_w = dense_weight_grad(grad, flat) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def fast_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` on the faster kernel where there is one (fp32/bf16) and the product is large
    enough for it, else `F.linear` itself (which also saves this function's autograd overhead).
    Under `torch.compile`, `F.linear`: the compiler picks its own kernel, and the size check would
    read symbolic shapes. Under autocast the operands are cast as autocast casts F.linear's; off
    the CPU it is F.linear."""
    if torch.compiler.is_compiling():
        return nn.functional.linear(x, weight, bias)
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    rows = x.numel() // max(1, x.shape[-1])
    if x.device.type != "cpu" or not dense_onednn_pays_off(rows, x.shape[-1], weight.shape[0], x.dtype):
        return nn.functional.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) computed with `fast_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_linear(x, self.weight, self.bias)
