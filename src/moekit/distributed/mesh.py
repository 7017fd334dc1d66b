"""The expert-parallel × data-parallel layout of the ranks, and the process groups it needs.

With world size W and expert-parallel size `ep`, there are `dp = W / ep` data-parallel replicas of
every expert shard. Ranks are laid out EP-major (consecutive ranks share an EP group, so on
multi-GPU nodes the all-to-all stays inside a node when `ep` divides the GPUs per node):

    rank = dp_rank * ep + ep_rank

    W = 4, ep = 2:  EP groups {0, 1} {2, 3}   (tokens are exchanged inside these)
                    DP groups {0, 2} {1, 3}   (replicas of the same expert shard)

- Dense parameters (embeddings, attention, routers, shared experts) are replicated on all W ranks;
  their gradients are summed over the world group.
- Expert shard `ep_rank` (experts [ep_rank * E/ep, (ep_rank + 1) * E/ep)) lives on the `dp` ranks of
  DP group `ep_rank`; its gradients are summed over that group only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moekit.errors import ConfigError, MoekitError, require_int


@dataclass(frozen=True)
class ParallelMesh:
    """This rank's place in the EP × DP layout and the groups it communicates over.

    A group is None when it spans this process alone (single process, or `ep = 1` / `dp = 1`), so
    that every collective on it is skipped; `world_group` is None exactly when W = 1.
    """

    world_size: int
    rank: int
    ep: int
    ep_group: object | None
    dp_group: object | None
    world_group: object | None

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs, metrics and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def expert_block(self, num_experts: int) -> tuple[int, int]:
        """[start, end) of the experts this rank holds."""
        per_rank = num_experts // self.ep
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size}: ep {self.ep_rank}/{self.ep}, dp {self.dp_rank}/{self.dp}"


def single_process_mesh() -> ParallelMesh:
    return ParallelMesh(world_size=1, rank=0, ep=1, ep_group=None, dp_group=None, world_group=None)


def check_ep_size(ep: int, world_size: int, num_experts: int | None = None) -> None:
    """`parallel.ep` must divide the world size and every MoE layer's number of experts."""
    require_int("parallel.ep", ep, minimum=1)
    if world_size % ep:
        raise ConfigError(
            "parallel.ep",
            f"got {ep}, expected a divisor of the world size {world_size} "
            f"(launch with e.g. torchrun --nproc_per_node {ep})",
        )
    if num_experts is not None and num_experts % ep:
        raise ConfigError(
            "parallel.ep", f"got {ep}, expected a divisor of the number of experts ({num_experts})"
        )


def build_mesh(ep: int) -> ParallelMesh:
    """The mesh over the initialised default process group (or one process if there is none).

    Every rank must call this with the same `ep`: creating a subgroup is collective over the world.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if ep != 1:
            raise ConfigError(
                "parallel.ep",
                f"got {ep} in a single process; launch {ep} or more processes, "
                f"e.g. torchrun --nproc_per_node {ep} -m moekit train ...",
            )
        return single_process_mesh()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_ep_size(ep, world_size)
    if world_size == 1:
        return single_process_mesh()
    dp = world_size // ep
    ep_group = dp_group = None
    # new_group is collective: every rank creates every group, in the same order.
    for d in range(dp):
        group = dist.new_group([d * ep + e for e in range(ep)]) if ep > 1 else None
        if d == rank // ep:
            ep_group = group
    for e in range(ep):
        group = dist.new_group([d * ep + e for d in range(dp)]) if dp > 1 else None
        if e == rank % ep:
            dp_group = group
    return ParallelMesh(world_size, rank, ep, ep_group, dp_group, dist.group.WORLD)


def default_backend() -> str:
    """gloo for CPU tensors, NCCL for CUDA tensors when there is a GPU: one code path for both."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_environment(timeout_s: float = 600.0) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ...); true if this
    call initialised it. Nothing happens for a single process or an already initialised group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or dist.is_initialized():
        return False
    if not dist.is_available():
        raise MoekitError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=default_backend(), timeout=timedelta(seconds=timeout_s))
    return True
