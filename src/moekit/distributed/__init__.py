"""Expert parallelism on PyTorch's own distributed engine (gloo on CPU, NCCL on GPU).

- `mesh`: the EP × DP layout of the ranks and its process groups.
- `dispatch`: the autograd-aware all-to-all row exchange.
- `expert_parallel`: MoE layers whose routed experts are sharded over the EP group.
- `grad_sync`: gradient sums over the right groups and global gradient-norm clipping.
- `checkpoint`: save gathered (single-process format), load sliced: any EP size loads any other.
"""

from moekit.distributed.checkpoint import full_model_tensors, load_checkpoint, save_checkpoint
from moekit.distributed.expert_parallel import ExpertParallelExperts, gather_experts, make_expert_parallel
from moekit.distributed.grad_sync import clip_grad_norm, full_gradients, global_grad_norm, sync_gradients
from moekit.distributed.local import run_local
from moekit.distributed.mesh import (
    ParallelMesh,
    build_mesh,
    check_ep_size,
    init_from_environment,
    single_process_mesh,
)

__all__ = [
    "ExpertParallelExperts",
    "ParallelMesh",
    "build_mesh",
    "check_ep_size",
    "clip_grad_norm",
    "full_gradients",
    "full_model_tensors",
    "gather_experts",
    "global_grad_norm",
    "init_from_environment",
    "run_local",
    "load_checkpoint",
    "make_expert_parallel",
    "save_checkpoint",
    "single_process_mesh",
    "sync_gradients",
]
