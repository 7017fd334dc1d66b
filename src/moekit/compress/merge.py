"""Expert merging: cluster a layer's experts, align their neurons, average each cluster into one.

Clustering follows HC-SMoE (Chen et al. 2025, "Retraining-Free Merging of Sparse MoE via
Hierarchical Clustering"): agglomerative clustering, average linkage, of each expert's mean output
over all calibration tokens. Before averaging, every member's intermediate neurons are permuted to
match the cluster's most frequent expert (M-SMoE, Li et al. 2024, §3.2 "permutation alignment"),
gate, up and down together so that each SwiGLU neuron moves as one. The merged expert is the
frequency-weighted average (M-SMoE Eq. 5), and its router row the same average of the members'
rows, so router and experts change consistently.
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


def merge_layer(
    tensors: dict[str, Tensor], labels: Tensor, weights: Tensor, ff: int, align: bool
) -> dict[str, Tensor]:
    """Merge one layer: cluster c becomes the `weights`-weighted average of its members."""
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
            else:
                stacked = tensors[key][members].double()
            shape = (-1,) + (1,) * (stacked.dim() - 1)
            merged[key].append((stacked * w.view(shape)).sum(0).to(tensors[key].dtype))
    return {k: torch.stack(v) for k, v in merged.items()}


@dataclass
class MergeResult:
    model: nn.Module
    labels: list[Tensor]  # per layer, each original expert's merged index


def merge(model: nn.Module, calibration: Calibration, keep: float | int, align: bool = True) -> MergeResult:
    """The model with each layer's experts merged into `keep` (HC-SMoE clusters, see module doc)."""
    layers = find_moe_layers(model)
    if len(layers) != len(calibration.layers):
        raise MoekitError("merge: the calibration does not belong to this model (layer count differs)")
    spec = layers[0][1].config.router
    count = resolve_keep(keep, spec.num_experts, spec.top_k, "merge.keep")
    new_layers, all_labels = [], []
    for (name, moe), stats in zip(layers, calibration.layers, strict=True):
        experts = packed_experts(name, moe)
        labels = cluster_outputs(stats.output_mean, count, spec.num_groups)
        new_layers.append(merge_layer(layer_tensors(name, moe), labels, stats.count, experts.ff_size, align))
        all_labels.append(labels)
    return MergeResult(rebuild(model, new_layers, count), all_labels)
