"""Expert merging: cluster a layer's experts, align their neurons, average each cluster into one.

Clustering follows HC-SMoE (Chen et al. 2025, "Retraining-Free Merging of Sparse MoE via
Hierarchical Clustering"): agglomerative clustering, average linkage, of each expert's mean output
over all calibration tokens. Before averaging, every member's intermediate neurons are permuted to
match the cluster's most frequent expert (M-SMoE, Li et al. 2024, §3.2 "permutation alignment"),
gate, up and down together so that each SwiGLU neuron moves as one. The merged expert is the
frequency-weighted average (M-SMoE Eq. 5), and its router row the same average of the members'
rows, so router and experts change consistently.

`method="sub_moe"` (Sub-MoE, Li et al. 2025, "MoE LLM Compression via Subspace Expert Merging")
keeps the same clusters, alignment and router rows, but merges each expert matrix in the cluster's
shared subspace: a joint SVD of the members' concatenated weights gives one U for the cluster and
one V_i per member; the V_i are averaged by frequency and the merged matrix rebuilt from the top
`rank` directions. At full rank this equals the frequency-weighted average; a lower rank projects
it onto the cluster's dominant shared output subspace. The stored expert stays dense (the packed
expert layout has no factored form), so `rank` changes the weights, not the bytes.
Deviation: the paper clusters by K-means on output cosine similarity; here the HC-SMoE clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from moekit.analysis.recorder import find_moe_layers
from moekit.compress.calibrate import Calibration, packed_experts
from moekit.compress.prune import resolve_keep
from moekit.compress.surgery import layer_tensors, rebuild
from moekit.errors import ConfigError, MoekitError


def cluster_outputs(features: Tensor, clusters: int, num_groups: int = 1) -> Tensor:
    """[E] cluster label per expert, labels 0..clusters-1 numbered by their lowest member; with
    group-limited routing, experts cluster only within their own contiguous group."""
    from scipy.cluster.hierarchy import fcluster, linkage

    num = features.shape[0]
    if clusters % num_groups:
        raise ConfigError(
            "merge.keep", f"{clusters} experts do not split evenly into {num_groups} router groups"
        )
    labels = np.zeros(num, dtype=np.int64)
    size, per = num // num_groups, clusters // num_groups
    x = features.double().cpu().numpy()
    for g in range(num_groups):
        part = x[g * size : (g + 1) * size]
        if per >= size:
            local = np.arange(size)
        else:
            local = fcluster(linkage(part, method="average"), t=per, criterion="maxclust") - 1
            local = _split_to_count(part, local, per)
        labels[g * size : (g + 1) * size] = local + g * per
    # renumber by first member so that merged experts keep the original order
    order = {}
    for label in labels:
        order.setdefault(int(label), len(order))
    return torch.tensor([order[int(label)] for label in labels], dtype=torch.long)


def _split_to_count(x: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """fcluster can return fewer clusters than asked when distances tie: split the largest
    clusters (their last member off) until there are `count`."""
    labels = labels.copy()
    while len(np.unique(labels)) < count:
        values, sizes = np.unique(labels, return_counts=True)
        biggest = values[np.argmax(sizes)]
        member = np.nonzero(labels == biggest)[0][-1]
        labels[member] = max(labels.max() + 1, 0)
    _, labels = np.unique(labels, return_inverse=True)
    return labels


def neuron_permutation(
    anchor_in: Tensor, anchor_out: Tensor, member_in: Tensor, member_out: Tensor
) -> Tensor:
    """perm [I] so that the member's neuron perm[i] best matches the anchor's neuron i (Hungarian
    assignment on the dot product of each neuron's [gate row | up row | down column])."""
    from scipy.optimize import linear_sum_assignment

    ff = anchor_out.shape[1]

    def features(w_in: Tensor, w_out: Tensor) -> Tensor:
        rows = w_in.reshape(-1, ff, w_in.shape[-1])  # [parts, I, d]: gate and up (or just in)
        return torch.cat([*rows.unbind(0), w_out.T], dim=1).double()

    similarity = features(anchor_in, anchor_out) @ features(member_in, member_out).T
    _, perm = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)
    return torch.from_numpy(perm).long()


def permute_neurons(tensors: dict[str, Tensor], e: int, perm: Tensor, ff: int) -> dict[str, Tensor]:
    """Expert `e`'s tensors with its intermediate neurons reordered by `perm` (output unchanged)."""
    w_in = tensors["experts.w_in"][e]
    parts = w_in.shape[0] // ff
    rows = torch.cat([perm + p * ff for p in range(parts)])
    out = {"experts.w_in": w_in[rows], "experts.w_out": tensors["experts.w_out"][e][:, perm]}
    if "experts.b_in" in tensors:
        out["experts.b_in"] = tensors["experts.b_in"][e][rows]
    if "experts.b_out" in tensors:
        out["experts.b_out"] = tensors["experts.b_out"][e]
    return out


def union_decomposition(weights: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Sub-MoE "Experts Union Decomposition": for members W_i [d_out, d_in] (stacked [m, d_out,
    d_in]), [W_1 … W_m] = U Σ [V_1ᵀ … V_mᵀ] concatenated along the input dimension. Returns the
    shared U [d_out, r], Σ [r] and per-member V [m, d_in, r], truncated to `rank` (None: all)."""
    m, d_out, d_in = weights.shape
    joint = weights.permute(1, 0, 2).reshape(d_out, m * d_in)
    u, s, vh = torch.linalg.svd(joint, full_matrices=False)
    r = s.numel() if rank is None else min(rank, s.numel())
    return u[:, :r], s[:r], vh[:r].reshape(r, m, d_in).permute(1, 2, 0)


def subspace_merge(weights: Tensor, frequencies: Tensor, rank: int | None = None) -> Tensor:
    """Sub-MoE subspace merging: W = U_r Σ_r (Σ_i f_i V_i,r)ᵀ with f normalised to sum 1
    (frequency-based merging of the expert-specific V blocks, rebuilt on the shared U)."""
    u, s, v = union_decomposition(weights, rank)
    f = frequencies.to(v.dtype) / frequencies.sum()
    v_merged = (v * f.view(-1, 1, 1)).sum(0)
    return (u * s) @ v_merged.T


def merge_layer(
    tensors: dict[str, Tensor],
    labels: Tensor,
    weights: Tensor,
    ff: int,
    align: bool,
    method: str = "hc_smoe",
    rank: int | None = None,
) -> dict[str, Tensor]:
    """Merge one layer: cluster c becomes the `weights`-weighted average of its members (weight
    matrices merged in their shared subspace with `method="sub_moe"`)."""
    clusters = int(labels.max()) + 1
    merged: dict[str, list[Tensor]] = {k: [] for k in tensors}
    for c in range(clusters):
        members = torch.nonzero(labels == c).flatten()
        w = weights[members].double()
        w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(members))
        anchor = int(members[torch.argmax(weights[members])])
        parts = []
        for m in members.tolist():
            perm = torch.arange(ff)
            if align and m != anchor:
                perm = neuron_permutation(
                    tensors["experts.w_in"][anchor], tensors["experts.w_out"][anchor],
                    tensors["experts.w_in"][m], tensors["experts.w_out"][m],
                )  # fmt: skip
            parts.append(permute_neurons(tensors, m, perm, ff))
        for key in tensors:
            if key.startswith("experts."):
                stacked = torch.stack([p[key].double() for p in parts])
                if method == "sub_moe" and stacked.dim() == 3:
                    merged[key].append(subspace_merge(stacked, w, rank).to(tensors[key].dtype))
                    continue
            else:
                stacked = tensors[key][members].double()
            shape = (-1,) + (1,) * (stacked.dim() - 1)
            merged[key].append((stacked * w.view(shape)).sum(0).to(tensors[key].dtype))
    return {k: torch.stack(v) for k, v in merged.items()}


@dataclass
class MergeResult:
    model: nn.Module
    labels: list[Tensor]  # per layer, each original expert's merged index


MERGE_METHODS = ("hc_smoe", "sub_moe")


def check_rank(rank: int | None, hidden: int, ff: int) -> None:
    """A Sub-MoE rank caps every expert matrix's rank; above the largest matrix side it means nothing."""
    if rank is None:
        return
    largest = max(hidden, 2 * ff)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= largest:
        raise ConfigError(
            "merge.rank",
            f"got {rank!r}, expected an integer in 1..{largest} (the largest expert weight side)",
        )


def merge(
    model: nn.Module,
    calibration: Calibration,
    keep: float | int,
    align: bool = True,
    method: str = "hc_smoe",
    rank: int | None = None,
) -> MergeResult:
    """The model with each layer's experts merged into `keep` (HC-SMoE clusters, averaged or
    Sub-MoE subspace-merged, see module doc)."""
    layers = find_moe_layers(model)
    if len(layers) != len(calibration.layers):
        raise MoekitError("merge: the calibration does not belong to this model (layer count differs)")
    if method not in MERGE_METHODS:
        raise ConfigError("merge.method", f"got {method!r}, expected one of {', '.join(MERGE_METHODS)}")
    if rank is not None and method != "sub_moe":
        raise ConfigError("merge.rank", "only method sub_moe takes a rank")
    spec = layers[0][1].config.router
    count = resolve_keep(keep, spec.num_experts, spec.top_k, "merge.keep")
    for name, moe in layers:
        experts = packed_experts(name, moe)
        check_rank(rank, experts.hidden_size, experts.ff_size)
    new_layers, all_labels = [], []
    for (name, moe), stats in zip(layers, calibration.layers, strict=True):
        experts = packed_experts(name, moe)
        labels = cluster_outputs(stats.output_mean, count, spec.num_groups)
        tensors = layer_tensors(name, moe)
        new_layers.append(merge_layer(tensors, labels, stats.count, experts.ff_size, align, method, rank))
        all_labels.append(labels)
    return MergeResult(rebuild(model, new_layers, count), all_labels)
