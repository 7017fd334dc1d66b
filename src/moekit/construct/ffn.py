"""One dense SwiGLU FFN into E routed experts (and optionally a shared one), as pure tensor maps.

A dense FFN is `down @ (silu(gate @ x) * (up @ x))` with gate, up [I, H] and down [H, I]. Every
recipe returns experts as packed tensors (gate, up [E, I_e, H], down [E, H, I_e]) plus a shared
FFN or None, and a short description of where each part came from (the receipt's provenance).

- copy: Sparse Upcycling (Komatsuzaki et al., 2023, §3.1): every expert is the dense FFN; with
  top-k weights that sum to 1 the MoE computes the dense FFN exactly.
- drop: Drop-Upcycling (Nakamura et al., ICLR 2025, §3.2, eq. 3): per expert, a random fraction r
  of the intermediate neurons gets fresh gate/up rows and down columns drawn from N(mean, std) of
  the dense matrix they replace; the rest stays a copy. r=0 is copy.
- split: the intermediate neurons partitioned into E fine-grained experts (LLaMA-MoE, Zhu et al.
  2024, §3.1; FactorLLM, Zhao et al. 2024): with every expert active and weight 1/E per expert the
  down projections are scaled by E, so the sum of experts is the dense FFN exactly; with top-k
  renormalised weights (1/k each at a uniform router) the output is N/k times k of the E parts,
  an unbiased estimate of the dense FFN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.errors import ConfigError

METHODS = ("copy", "drop", "split")
PARTITIONS = ("contiguous", "random", "cluster")


@dataclass(frozen=True)
class DenseFFN:
    gate: Tensor  # [I, H]
    up: Tensor  # [I, H]
    down: Tensor  # [H, I]

    @property
    def ff_size(self) -> int:
        return self.gate.shape[0]


@dataclass(frozen=True)
class Experts:
    gate: Tensor  # [E, I_e, H]
    up: Tensor  # [E, I_e, H]
    down: Tensor  # [E, H, I_e]
    shared: DenseFFN | None
    provenance: str  # how the routed experts were made (one line for the receipt)
    shared_provenance: str | None = None


def drop_reinit(weight: Tensor, rows: Tensor, generator: torch.Generator, dim: int) -> Tensor:
    """Drop-Upcycling eq. 3: the `rows` (indices along `dim`) of `weight` re-drawn from
    N(mean(weight), std(weight)), the statistics of the whole dense matrix."""
    out = weight.clone()
    mean, std = weight.double().mean(), weight.double().std()
    shape = list(weight.shape)
    shape[dim] = len(rows)
    fresh = torch.randn(shape, generator=generator, dtype=torch.float64).mul_(std).add_(mean)
    out.index_copy_(dim, rows, fresh.to(weight.dtype))
    return out


def balanced_clusters(features: Tensor, groups: int, seed: int, iterations: int = 10) -> Tensor:
    """Equal-size spherical k-means of the rows of `features` [I, F]: a permutation of range(I)
    whose consecutive blocks of I/groups are the clusters (LLaMA-MoE's co-activation clustering,
    kept balanced by a greedy capacity-limited assignment, most similar pairs first)."""
    n = features.shape[0]
    size = n // groups
    x = torch.nn.functional.normalize(features.double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:groups]]
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        similarity = x @ centroids.T  # [I, groups]
        order = torch.argsort(similarity.flatten(), descending=True, stable=True)
        labels = torch.full((n,), -1, dtype=torch.long)
        room = [size] * groups
        for flat in order.tolist():
            row, group = divmod(flat, groups)
            if labels[row] < 0 and room[group] > 0:
                labels[row] = group
                room[group] -= 1
        centroids = torch.nn.functional.normalize(
            torch.stack([x[labels == g].mean(0) for g in range(groups)]), dim=1
        )
    return torch.argsort(labels, stable=True)


def partition(ff_size: int, groups: int, how: str, seed: int, features: Tensor | None = None) -> Tensor:
    """A permutation of the I neurons; block g of I/groups is expert g."""
    if how == "contiguous":
        return torch.arange(ff_size)
    if how == "random":
        return torch.randperm(ff_size, generator=torch.Generator().manual_seed(seed))
    if how == "cluster":
        if features is None:
            raise ConfigError("partition", "'cluster' needs activations of calibration text")
        return balanced_clusters(features, groups, seed)
    raise ConfigError("partition", f"got {how!r}, expected one of {', '.join(PARTITIONS)}")


def upcycle_ffn(
    ffn: DenseFFN,
    num_experts: int,
    method: str,
    *,
    seed: int = 0,
    drop_ratio: float = 0.5,
    noise: float = 0.0,
    shared: bool = False,
    shared_fraction: float = 0.25,
    split_partition: str = "contiguous",
    activations: Tensor | None = None,
) -> Experts:
    """The experts of one layer (see the module docstring for the recipes).

    `shared`: copy/drop keep a copy of the dense FFN as the shared expert and halve both halves'
    down projections (so that shared + routed is the dense FFN again); split moves the first
    `shared_fraction` of the neurons (after partitioning) into the shared expert. The caller
    compensates a family's shared-expert gate (Qwen2-MoE's sigmoid, 0.5 at a zero gate).
    `noise`: multiplicative Gaussian noise std on every routed expert weight (levanter's
    UpcycleLm uses 1e-3), breaking the symmetry of copied experts.
    `activations` [tokens, I]: the FFN's intermediate activations on calibration text
    (split's `cluster` partition).
    """
    if method not in METHODS:
        raise ConfigError("method", f"got {method!r}, expected one of {', '.join(METHODS)}")
    if not 0.0 <= drop_ratio <= 1.0:
        raise ConfigError("drop_ratio", f"got {drop_ratio}, expected a number in [0, 1]")
    gen = torch.Generator().manual_seed(seed)
    e, size = num_experts, ffn.ff_size
    shared_ffn, shared_note = None, None
    if method in ("copy", "drop"):
        scale = 0.5 if shared else 1.0
        gate = ffn.gate.expand(e, -1, -1).clone()
        up = ffn.up.expand(e, -1, -1).clone()
        down = (ffn.down * scale).expand(e, -1, -1).clone()
        note = f"copy of the dense FFN x{e}" + (" (down x0.5, the other half is the shared expert)" * shared)
        if method == "drop":
            count = round(drop_ratio * size)
            for i in range(e):
                rows = torch.randperm(size, generator=gen)[:count]
                gate[i] = drop_reinit(ffn.gate, rows, gen, 0)
                up[i] = drop_reinit(ffn.up, rows, gen, 0)
                down[i] = drop_reinit(ffn.down, rows, gen, 1) * scale
            note += (
                f"; Drop-Upcycling: {count}/{size} neurons per expert re-drawn from N(mean, std), seed {seed}"
            )
        if shared:
            shared_ffn = DenseFFN(ffn.gate.clone(), ffn.up.clone(), ffn.down * 0.5)
            shared_note = "copy of the dense FFN (down x0.5)"
    else:
        rest = torch.arange(size)
        shared_size = 0
        if shared:
            shared_size = round(shared_fraction * size)
            if not 0 < shared_size < size:
                raise ConfigError(
                    "shared_fraction", f"got {shared_fraction}, which leaves no shared or no routed neurons"
                )
            if split_partition == "cluster" and activations is not None:
                # the most active neurons on calibration text are always on (DeepSeekMoE's shared idea)
                ranked = torch.argsort(activations.abs().mean(0), descending=True, stable=True)
            else:
                ranked = partition(size, 1, split_partition, seed + 1)
            shared_rows, rest = ranked[:shared_size], torch.sort(ranked[shared_size:]).values
            shared_ffn = DenseFFN(ffn.gate[shared_rows], ffn.up[shared_rows], ffn.down[:, shared_rows])
            shared_note = f"{shared_size} of {size} neurons ({split_partition} choice), unscaled"
        if (size - shared_size) % e:
            raise ConfigError(
                "experts", f"the FFN's {size - shared_size} routed neurons do not divide into {e} experts"
            )
        features = None if activations is None else activations[:, rest].T
        order = rest[partition(len(rest), e, split_partition, seed, features)]
        routed = size - shared_size
        per = routed // e
        blocks = order.view(e, per)
        gate = ffn.gate[blocks]
        up = ffn.up[blocks]
        down = torch.stack([ffn.down[:, b] for b in blocks]) * e
        note = f"split: {routed} neurons into {e} experts of {per} ({split_partition}), down x{e}"
    if noise > 0:
        for t in (gate, up, down):
            t.mul_(1 + noise * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype))
        note += f"; multiplicative noise std {noise}, seed {seed}"
    return Experts(gate, up, down, shared_ffn, note, shared_note)
