"""The layers moekit is measured against, built with the same weights as the moekit layer.

Every implementation is a `Contender`: a module, and how to call it on [T, d] hidden states.
Peers come from the `bench` extra (transformers, deepspeed); a missing one is reported, not fatal.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.experts.activations import swiglu_with_grad
from moekit.kernels.linear import fast_linear
from moekit.layer import MoE


@dataclass
class Contender:
    impl: str
    module: nn.Module
    run: Callable[[Tensor], Tensor]


class DenseEquivalent(nn.Module):
    """One SwiGLU GEMM chain with the active FLOPs of top-k experts: d -> 2*k*ff -> d.

    What an MoE layer would cost if routing, permutation and combine were free: the practical limit.
    By default its GEMMs run on the fastest kernel moekit has for products of its size
    (`moekit.kernels.gemm`: oneDNN here) and its SwiGLU on the experts' own activation kernel, so
    the ratio to it measures routing and dispatch, not a choice of kernels; `stock=True` uses
    torch's own `F.linear` and `F.silu`, as a user's dense layer runs.
    """

    def __init__(self, hidden: int, active_ff: int, stock: bool = False):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(2 * active_ff, hidden) * hidden**-0.5)
        self.w_out = nn.Parameter(torch.randn(hidden, active_ff) * active_ff**-0.5)
        self.linear = F.linear if stock else fast_linear
        self.stock = stock

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear(x, self.w_in)
        if self.stock:
            gate, up = h.chunk(2, dim=-1)
            return self.linear(F.silu(gate) * up, self.w_out)
        return self.linear(swiglu_with_grad(h), self.w_out)


def moekit_contender(layer: MoE) -> Contender:
    return Contender("moekit", layer, layer)


def dense_contenders(hidden: int, ff: int, top_k: int) -> list[Contender]:
    """`dense` on moekit's GEMM kernel (the limit the ratios refer to) and `dense_torch` on F.linear."""
    dense = DenseEquivalent(hidden, top_k * ff)
    stock = DenseEquivalent(hidden, top_k * ff, stock=True)
    return [Contender("dense", dense, dense), Contender("dense_torch", stock, stock)]


def hf_qwen3_contenders(layer: MoE) -> list[Contender]:
    """HF transformers' Qwen3-MoE sparse block, eager and grouped_mm experts, sharing `layer`'s weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    spec = layer.config.router
    out = []
    for implementation in ("eager", "grouped_mm"):
        config = Qwen3MoeConfig(
            hidden_size=layer.config.hidden_size,
            moe_intermediate_size=layer.config.ff_size,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k,
            norm_topk_prob=spec.renorm == "sum",
        )
        config._experts_implementation = implementation
        block = Qwen3MoeSparseMoeBlock(config)
        with torch.no_grad():
            block.gate.weight.copy_(layer.router.weight)
            block.experts.gate_up_proj.copy_(layer.experts.w_in)
            block.experts.down_proj.copy_(layer.experts.w_out)

        def run(x: Tensor, block=block) -> Tensor:
            return block(x.unsqueeze(0)).squeeze(0)

        out.append(Contender(f"hf_{implementation}", block, run))
    return out


class _SwiGLUExpert(nn.Module):
    def __init__(self, hidden: int, ff: int):
        super().__init__()
        self.w_in = nn.Linear(hidden, 2 * ff, bias=False)
        self.w_out = nn.Linear(ff, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


def _init_single_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def deepspeed_contender(layer: MoE) -> Contender:
    """DeepSpeed-MoE's layer (dropless, same SwiGLU experts and router weights)."""
    import logging

    import deepspeed
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    _init_single_process_group()
    cfg = layer.config
    spec = cfg.router
    moe = DeepSpeedMoE(
        hidden_size=cfg.hidden_size,
        expert=_SwiGLUExpert(cfg.hidden_size, cfg.ff_size),
        num_experts=spec.num_experts,
        ep_size=1,
        k=spec.top_k,
        drop_tokens=False,
        use_rts=False,
    )
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(layer.router.weight)
        for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.w_in.weight.copy_(layer.experts.w_in[e])
            expert.w_out.weight.copy_(layer.experts.w_out[e])
    del deepspeed

    def run(x: Tensor) -> Tensor:
        return moe(x.unsqueeze(0))[0].squeeze(0)

    return Contender("deepspeed", moe, run)


PEERS: dict[str, Callable[[MoE], list[Contender]]] = {
    "hf": hf_qwen3_contenders,
    "deepspeed": lambda layer: [deepspeed_contender(layer)],
}
PEER_PACKAGES = {"hf": "transformers", "deepspeed": "deepspeed"}
