"""PreMoe (Pei et al. 2025, "PreMoe: Lightening MoEs on Constrained Memory by Expert Pruning and
Retrieval"): per-domain expert masks, and retrieval of the mask for a prompt's domain at inference.

- PEP: each domain ranks the experts of every MoE layer by TCESS, its task-conditioned expected
  selection score, and keeps its `keep` best. The released code sums each token's raw router logit
  into its top-1 expert (`score="logit"`); softmax routing is blind to a shift of the logits, so
  where they are negative that ranks the most-used experts last. The default sums the routing
  probability instead (`score="probability"`: non-negative, shift-free), one reading of the later
  paper's unpinned "logit transformation".
- TAER: each domain stores a key, the first MoE layer's TCESS vector over its calibration tokens;
  a prompt's first `window` tokens give a query vector the same way, and the nearest key (L2, the
  paper's `IndexFlatL2`) names the domain whose masks are applied, through routing overrides
  (`moekit.routing.override`): the other experts are never chosen.

`DomainMasks` is what `moekit compress` (method `premoe`) stores beside the compressed model
(`premoe.safetensors` + `premoe.json`), and what `moekit generate --premoe` and
`moekit eval-tasks --method premoe` load.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.errors import ConfigError, MoekitError
from moekit.routing.override import Overrides, RoutingCapture, RoutingOverride, override_routing

TENSORS_FILE = "premoe.safetensors"
SCORES = ("probability", "logit")
META_FILE = "premoe.json"


def tcess(logits: Tensor, top1: Tensor) -> Tensor:
    """PreMoe's TCESS summed over tokens, as in the released code (`collect_utils.py`, k = 1,
    r = -1): each token adds its router logit (or another per-expert value, e.g. its routing
    probability) to its top-1 expert and 0 to the others. [T, E] values and [T] top-1 experts ->
    [E] float64 sums (divide by T for the paper's expectation)."""
    logits, top1 = logits.detach().double().cpu(), top1.long().cpu()
    picked = logits.gather(1, top1[:, None]).flatten()
    return torch.zeros(logits.shape[-1], dtype=torch.float64).index_add_(0, top1, picked)


def first_choices(routing: Any) -> Tensor:
    """[T] each token's first-choice expert (rank 0 of the router's preference, selection bias
    and masks included), or its largest logit if capacity dropped it."""
    top1 = routing.logits.detach().argmax(dim=-1).cpu()
    for part in (routing.dropped, routing.kept):
        first = part.rank == 0
        top1[part.token[first].cpu()] = part.expert[first].cpu()
    return top1


@torch.no_grad()
def layer_logits(
    model: nn.Module, batch: Any, score: str = "probability"
) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """(per MoE layer the router logits or probabilities [T, E] and first choices [T] of one
    forward, the real-token mask [T])."""
    from moekit.analysis.recorder import default_forward, routing_probabilities

    capture = RoutingCapture()
    with override_routing(model, Overrides(capture=capture)):
        default_forward(model, batch)
    routings = [capture.routings[i][0] for i in range(len(capture.routings))]
    value = routing_probabilities if score == "probability" else (lambda r: r.logits)
    out = [(value(r), first_choices(r)) for r in routings]
    mask = getattr(batch, "token_mask", None)
    real = torch.ones(out[0][0].shape[0], dtype=torch.bool) if mask is None else mask.flatten().cpu()
    return out, real


@torch.no_grad()
def domain_scores(
    model: nn.Module, batches: Iterable[Any], num_domains: int, score: str = "probability"
) -> tuple[Tensor, Tensor]:
    """(TCESS sums [D, L, E], real tokens [D]) of each domain over batches whose tokens carry a
    domain id (`batch.domains`)."""
    sums, tokens = None, torch.zeros(num_domains, dtype=torch.float64)
    for batch in batches:
        logits, real = layer_logits(model, batch, score)
        domains = batch.domains.flatten().cpu()
        if sums is None:
            sums = torch.zeros(num_domains, len(logits), logits[0][0].shape[-1], dtype=torch.float64)
        for d in range(num_domains):
            rows = real & (domains == d)
            if rows.any():
                tokens[d] += int(rows.sum())
                for i, (layer, top1) in enumerate(logits):
                    sums[d, i] += tcess(layer[rows.to(layer.device)], top1[rows])
    if sums is None:
        raise MoekitError("premoe: no calibration batch")
    return sums, tokens


def domain_keep(scores: Tensor, keep: int, num_groups: int = 1) -> Tensor:
    """bool [D, L, E]: each domain's `keep` experts of highest TCESS in every layer (PEP)."""
    from moekit.compress.prune import top_experts

    out = torch.zeros(scores.shape, dtype=torch.bool)
    for d in range(scores.shape[0]):
        for i in range(scores.shape[1]):
            out[d, i, top_experts(scores[d, i], keep, num_groups)] = True
    return out


@dataclass
class DomainMasks:
    """Per domain: its retrieval key (first MoE layer's mean TCESS, [E]) and the experts it keeps
    in every MoE layer (bool [L, E]); `window`: the prompt tokens a query reads; `score`: what
    TCESS sums (keys and queries alike)."""

    domains: tuple[str, ...]
    keys: Tensor  # [D, E] float64
    kept: Tensor  # bool [D, L, E]
    window: int = 32
    score: str = "probability"

    def __post_init__(self) -> None:
        d, e = len(self.domains), self.kept.shape[-1]
        if self.keys.shape != (d, e) or self.kept.shape[0] != d:
            raise MoekitError(
                f"premoe: keys {tuple(self.keys.shape)} and masks {tuple(self.kept.shape)} "
                f"do not fit {d} domains of {e} experts"
            )

    def overrides(self, domain: int, capture: RoutingCapture | None = None) -> Overrides:
        """Routing overrides masking, in every MoE layer, the experts `domain` does not keep."""
        layers: dict[int | str, RoutingOverride] = {
            i: RoutingOverride(mask=~self.kept[domain, i]) for i in range(self.kept.shape[1])
        }
        return Overrides(layers=layers, capture=capture)

    def query(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """The query vector [E] of one prompt (ids [S] or [1, S]): the first MoE layer's mean TCESS
        over its first `window` tokens, with no mask applied."""
        ids = input_ids.reshape(1, -1)[:, : self.window].long()
        (first, top1), *_ = layer_logits(model, {"input_ids": ids.to(_device(model))}, self.score)[0]
        if first.shape[-1] != self.keys.shape[1]:
            raise MoekitError(
                f"premoe: the masks are for {self.keys.shape[1]} experts per layer, "
                f"the model has {first.shape[-1]}"
            )
        return tcess(first, top1) / ids.shape[1]

    def retrieve(self, model: nn.Module, input_ids: Tensor) -> tuple[int, Tensor]:
        """(the domain whose key is nearest the prompt's query, L2 distances to every key [D])."""
        distances = torch.linalg.vector_norm(self.keys - self.query(model, input_ids)[None], dim=1)
        return int(distances.argmin()), distances

    def save(self, folder: Path) -> None:
        from moekit.io import save_tensors_atomic, write_json_atomic

        save_tensors_atomic(
            Path(folder) / TENSORS_FILE,
            {"keys": self.keys.double().contiguous(), "kept": self.kept.to(torch.uint8).contiguous()},
        )
        write_json_atomic(
            Path(folder) / META_FILE,
            {"method": "premoe", "domains": list(self.domains), "window": self.window, "score": self.score},
        )

    @classmethod
    def load(cls, folder: Path) -> DomainMasks:
        """The masks stored in `folder`; a missing or damaged pair is one clear error."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from moekit.io import read_json

        folder = Path(folder)
        if not (folder / TENSORS_FILE).is_file() or not (folder / META_FILE).is_file():
            raise MoekitError(
                f"{folder}: no PreMoe masks ({TENSORS_FILE}, {META_FILE}); "
                "write them with `moekit compress` and a recipe of method premoe"
            )
        meta = read_json(folder / META_FILE, "PreMoe masks")
        try:
            tensors = load_file(str(folder / TENSORS_FILE))
            domains, window, score = tuple(meta["domains"]), int(meta["window"]), str(meta["score"])
            return cls(domains, tensors["keys"], tensors["kept"].bool(), window, score)
        except (SafetensorError, KeyError, TypeError, ValueError) as exc:
            raise MoekitError(f"{folder / TENSORS_FILE}: not usable PreMoe masks ({exc})") from None


def load_masks(source: Path) -> DomainMasks:
    """The masks stored with a compressed model: in `source`, or beside the checkpoint it names."""
    source = Path(source)
    for folder in (source, source.parent, source.parent.parent):
        if (folder / TENSORS_FILE).is_file():
            return DomainMasks.load(folder)
    return DomainMasks.load(source)  # the error names what is missing


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def build_masks(
    model: nn.Module,
    batches: Sequence[Any],
    domain_names: Sequence[str],
    keep: int,
    window: int,
    score: str = "probability",
) -> tuple[DomainMasks, Tensor]:
    """PreMoe's masks and keys of `model` from calibration batches of several domains; also the
    TCESS sums [D, L, E]."""
    from moekit.addressing import require_moe_layers

    layers = require_moe_layers(model, "premoe")
    spec = layers[0][2].config.router
    if score not in SCORES:
        raise ConfigError("premoe.score", f"got {score!r}, expected one of {', '.join(SCORES)}")
    sums, tokens = domain_scores(model, batches, len(domain_names), score)
    present = [d for d in range(len(domain_names)) if tokens[d] > 0]  # domains the batches reached
    if len(present) < 2:
        raise ConfigError(
            "premoe",
            f"needs calibration tokens of at least two domains, got {len(present)}; give more batches",
        )
    sums, tokens = sums[present], tokens[present]
    kept = domain_keep(sums, keep, spec.num_groups)
    keys = sums[:, 0] / tokens[:, None]
    return DomainMasks(tuple(domain_names[d] for d in present), keys, kept, window, score), sums


def remap(masks: DomainMasks, positions: list[list[int]], keys: Tensor) -> DomainMasks:
    """`masks` in the numbering of a pruned model whose layer i holds original expert
    `positions[i][p]` at position p (-1: padding, never kept), with `keys` computed on it."""
    d, layers = masks.kept.shape[:2]
    width = len(positions[0])
    kept = torch.zeros(d, layers, width, dtype=torch.bool)
    for i, layout in enumerate(positions):
        for p, expert in enumerate(layout):
            if expert >= 0:
                kept[:, i, p] = masks.kept[:, i, expert]
    return DomainMasks(masks.domains, keys, kept, masks.window, masks.score)


def union_keep(kept: Tensor, sums: Tensor, num_groups: int) -> list[Tensor]:
    """Per layer, the experts some domain keeps (sorted ids). Under group-limited routing every
    group is filled up to the fullest group's count with its experts of highest summed TCESS, so
    the groups stay equal."""
    out = []
    for i in range(kept.shape[1]):
        chosen = kept[:, i].any(0)
        num = chosen.numel()
        if num_groups > 1:
            size = num // num_groups
            target = max(int(chosen[g * size : (g + 1) * size].sum()) for g in range(num_groups))
            total = sums[:, i].sum(0)
            for g in range(num_groups):
                members = range(g * size, (g + 1) * size)
                spare = sorted((e for e in members if not chosen[e]), key=lambda e: (-float(total[e]), e))
                for e in spare[: target - int(chosen[g * size : (g + 1) * size].sum())]:
                    chosen[e] = True
        out.append(torch.nonzero(chosen).flatten())
    return out


def compress_premoe(
    model: nn.Module,
    batches: Sequence[Any],
    domain_names: Sequence[str],
    keep: int,
    window: int,
    score: str = "probability",
) -> tuple[nn.Module, list[list[int]], DomainMasks, dict[str, Any]]:
    """The model pruned to the experts some domain keeps (padded where layers differ), the
    position layout, the masks in its numbering with keys computed on it, and the report's part."""
    from moekit.addressing import require_moe_layers
    from moekit.compress.padding import pad
    from moekit.compress.surgery import select_rows

    spec = require_moe_layers(model, "premoe")[0][2].config.router
    masks, sums = build_masks(model, batches, domain_names, keep, window, score)
    union = union_keep(masks.kept, sums, spec.num_groups)
    details: dict[str, Any] = {}
    if len({int(u.numel()) for u in union}) == 1:
        compressed, positions = select_rows(model, union), [u.tolist() for u in union]
    else:
        padded = pad(model, union, [sums[:, i].sum(0) for i in range(sums.shape[1])])
        compressed, positions = padded.model, padded.positions
        layers = padded.layers
        details["padding"] = {
            "mode": padded.mode,
            "experts_kept": [len(layer["kept"]) for layer in layers],
            "layers": layers,
            "padding_bytes": sum(layer["padding_bytes"] for layer in layers),
        }
    scores, tokens = domain_scores(compressed, batches, len(domain_names), score)
    present = [list(domain_names).index(name) for name in masks.domains]
    stored = remap(masks, positions, scores[present, 0] / tokens[present, None])
    details["premoe"] = {
        "domains": list(masks.domains),
        "domains_without_calibration_tokens": sorted(set(domain_names) - set(masks.domains)),
        "keep": keep,
        "window": window,
        "score": score,
        "kept": {
            name: [torch.nonzero(masks.kept[d, i]).flatten().tolist() for i in range(masks.kept.shape[1])]
            for d, name in enumerate(masks.domains)
        },
        "union": [u.tolist() for u in union],
    }
    return compressed, positions, stored, details


@torch.no_grad()
def evaluate_masks(
    ref: Any,
    compressed: nn.Module,
    masks: DomainMasks,
    batches: Sequence[Any],
    domain_names: Sequence[str],
    maps: list[Tensor],
) -> dict[str, Any]:
    """Held-out loss of every domain under every domain's mask, and how often retrieval from a
    row's first `window` tokens names the row's own domain."""
    from moekit.compress.evaluate import compare

    losses = {}
    for d, name in enumerate(masks.domains):
        with override_routing(compressed, masks.overrides(d)):
            losses[name] = compare(ref, compressed, batches, domain_names, maps)["loss_after"]
    hits: dict[str, list[int]] = {name: [0, 0] for name in masks.domains}
    for batch in batches:
        for row in range(batch.input_ids.shape[0]):
            real = batch.token_mask[row]
            if not real.any():
                continue
            domain = int(batch.domains[row][real][0])
            if domain < 0 or domain_names[domain] not in hits:
                continue
            name = domain_names[domain]
            found, _ = masks.retrieve(compressed, batch.input_ids[row][real])
            hits[name][0] += int(masks.domains[found] == name)
            hits[name][1] += 1
    rows = sum(n for _, n in hits.values())
    return {
        "loss_by_mask": losses,
        "retrieval": {
            "accuracy": sum(h for h, _ in hits.values()) / max(rows, 1),
            "rows": rows,
            "by_domain": {k: {"correct": h, "rows": n} for k, (h, n) in hits.items() if n},
        },
    }
