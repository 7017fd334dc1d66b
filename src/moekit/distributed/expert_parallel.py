"""Expert parallelism: each rank of an EP group keeps E/ep of a layer's routed experts and the token
rows travel to them with all-to-all.

One layer's step on every EP rank, for its own tokens:
1. route locally (the router, its bias and the shared experts are replicated; nothing changes there);
2. send each kept assignment's token row to the rank holding its expert (counts first, then rows);
3. the receiving rank runs its experts *unweighted* (routing weight 1) on the grouped fast path;
4. the outputs go back the way they came, and the source rank multiplies them by the routing weight
   and combines them into its tokens.
Because the routing weight never leaves its rank, the router's gradient is formed locally by
ordinary autograd and never crosses a collective (moe-systems.md P11). With `weight_on="input"` the
source scales the rows before sending them instead, which is the same algebra.

Parameter names stay those of `PackedExperts` (`...experts.w_in` etc.), only the first dimension is
the local block, so a gathered state dict is the ordinary single-process one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit import addressing
from moekit.dispatch.grouped import grouped_experts
from moekit.distributed.dispatch import exchange_counts, exchange_rows
from moekit.distributed.mesh import ParallelMesh, check_ep_size
from moekit.errors import MoekitError
from moekit.experts.packed import PackedExperts
from moekit.layer import MoE
from moekit.routing.record import Routing

EXPERT_PARAMETERS = ("w_in", "w_out", "b_in", "b_out")


class ExpertParallelExperts(nn.Module):
    """Experts [first_expert, first_expert + num_local_experts) of a layer with `num_experts`, plus
    the EP group that holds the rest. A drop-in for `PackedExperts.compute`."""

    def __init__(self, full: PackedExperts, mesh: ParallelMesh):
        super().__init__()
        check_ep_size(mesh.ep, mesh.world_size, full.num_experts)
        start, end = mesh.expert_block(full.num_experts)
        self.num_experts = full.num_experts
        self.first_expert = start
        self.num_local_experts = end - start
        self.hidden_size = full.hidden_size
        self.ff_size = full.ff_size
        self.activation = full.activation
        self.ep = mesh.ep
        self.group = mesh.ep_group
        for name in EXPERT_PARAMETERS:
            tensor = getattr(full, name)
            block = None if tensor is None else nn.Parameter(tensor.detach()[start:end].clone())
            setattr(self, name, block)

    def compute(
        self, x: Tensor, routing: Routing, weight_on: str = "output", backend: str = "auto"
    ) -> Tensor:
        """Sum over the routing's kept compute assignments of weight * expert(x[token]), with the
        experts spread over the EP group. Collective: every EP rank must call it, tokens or not."""
        a = routing.compute_assignments
        ep, per_rank = self.ep, self.num_local_experts
        counts = torch.bincount(a.expert, minlength=self.num_experts)
        if counts.numel() != self.num_experts:
            raise MoekitError(
                f"expert-parallel layer: routing names expert {int(a.expert.max())}, "
                f"but the layer has {self.num_experts}"
            )
        send_counts = counts.view(ep, per_rank)
        recv_counts = exchange_counts(send_counts, self.group)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()

        weight = a.weight.to(x.dtype).unsqueeze(1)
        rows = x.index_select(0, a.token)
        if weight_on == "input":
            rows = rows * weight
        received = exchange_rows(rows, send_splits, recv_splits, self.group)
        # Received rows come grouped by source rank, then by local expert; the grouped path wants
        # them grouped by expert, which a stable sort of the local expert ids gives.
        local_expert = torch.arange(per_rank, device=x.device).repeat(ep)
        local_expert = local_expert.repeat_interleave(recv_counts.reshape(-1))
        order = torch.argsort(local_expert, stable=True)
        unit = received.new_ones(received.shape[0])
        outputs = grouped_experts(
            received,
            order,
            local_expert[order],
            unit,
            self.w_in,
            self.w_out,
            self.b_in,
            self.b_out,
            self.activation,
            weight_on="output",
            backend=backend,
        )
        returned = exchange_rows(outputs, recv_splits, send_splits, self.group)
        if weight_on == "output":
            returned = returned * weight
        return torch.zeros_like(x).index_add(0, a.token, returned)

    def extra_repr(self) -> str:
        end = self.first_expert + self.num_local_experts
        return (
            f"experts [{self.first_expert}, {end}) of {self.num_experts}, ep={self.ep}, "
            f"hidden={self.hidden_size}, ff={self.ff_size}, activation={self.activation.name}, "
            f"bias={self.b_in is not None}"
        )


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, layer) for _, name, layer in addressing.moe_layers(model)]


def make_expert_parallel(model: nn.Module, mesh: ParallelMesh) -> list[str]:
    """Replace the routed experts of every MoE layer of `model` by this rank's block (in place);
    returns the names of the layers converted. With `mesh.ep == 1` nothing changes.

    Every rank must hold the same full model when this runs (same seed or the same checkpoint):
    each keeps its slice. Build the optimizer afterwards: the expert parameters are new objects.
    """
    layers = moe_layers(model)
    if mesh.ep == 1:
        return []
    for name, moe in layers:
        if type(moe.experts) is not PackedExperts:  # subclasses may hold other parameters
            raise MoekitError(
                f"{name}: expert parallelism supports packed experts, got {type(moe.experts).__name__}"
            )
    for _, moe in layers:
        moe.experts = ExpertParallelExperts(moe.experts, mesh)
    return [name for name, _ in layers]


def expert_parallel_modules(model: nn.Module) -> list[tuple[str, ExpertParallelExperts]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)]


def sharded_parameter_names(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """`parameter name -> its module` for every parameter that holds only this rank's experts."""
    out = {}
    for prefix, module in expert_parallel_modules(model):
        for name in EXPERT_PARAMETERS:
            if getattr(module, name) is not None:
                out[f"{prefix}.{name}"] = module
    return out


def gather_experts(tensor: Tensor, mesh: ParallelMesh) -> Tensor:
    """The full [E, ...] tensor from every EP rank's block [E/ep, ...], in expert order.
    Collective over the EP group."""
    if mesh.ep_group is None:
        return tensor.detach().clone()
    parts = [torch.empty_like(tensor) for _ in range(mesh.ep)]
    dist.all_gather(parts, tensor.detach().contiguous(), group=mesh.ep_group)
    return torch.cat(parts, dim=0)
