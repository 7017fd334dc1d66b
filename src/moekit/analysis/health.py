"""The routing-health summary of a trace: every metric of `metrics.py`, per layer, JSON-ready.

This is what `moekit analyze` writes to metrics.json and what the report draws. Conventions: the
load of an expert counts kept assignments to compute experts; domain statistics count every
chosen assignment (the router's preference, before capacity); NMI uses each token's top-1 expert;
routing consistency (SRP) uses chosen experts, the cache (LRU/LFU/Belady, SCH) kept compute
experts, over runs of consecutive tokens of one document piece in one sequence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.analysis import metrics as m
from moekit.analysis.cache import hit_rate_curves, request_stream, segment_cache_curves
from moekit.analysis.super_experts import find_super_experts, super_expert_thresholds
from moekit.analysis.trace import LayerTrace, RoutingTrace
from moekit.errors import ConfigError, require_int

HEALTH_FORMAT = "moekit-routing-health"
HEALTH_VERSION = 1


@dataclass(frozen=True)
class HealthOptions:
    """Knobs of the summary. `cache_sizes` None = 1..E (at most 16 sizes, evenly spread);
    `max_cache_requests` bounds the LRU/LFU/Belady simulation (the first requests of the trace);
    `position_bin` None = positions grouped into about 32 bins."""

    segment_lengths: tuple[int, ...] = (4, 16, 64)
    cache_sizes: tuple[int, ...] | None = None
    max_cache_requests: int = 20_000
    position_bin: int | None = None
    overload_factor: float = 2.0
    purity_min_count: int = 2
    super_expert_quantile: float = 0.995
    super_expert_fraction: float = 0.1

    def __post_init__(self) -> None:
        for length in self.segment_lengths:
            require_int("segment_lengths", length, minimum=1)
        for size in self.cache_sizes or ():
            require_int("cache_sizes", size, minimum=1)
        require_int("max_cache_requests", self.max_cache_requests, minimum=1)
        if self.position_bin is not None:
            require_int("position_bin", self.position_bin, minimum=1)
        require_int("purity_min_count", self.purity_min_count, minimum=1)
        if not 0 < self.super_expert_quantile < 1:
            raise ConfigError("super_expert_quantile", f"got {self.super_expert_quantile}, expected (0, 1)")


def token_runs(trace: RoutingTrace) -> Tensor:
    """int64 [N] labelling runs of consecutive tokens: same sequence, same document, next column."""
    n = trace.num_tokens
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    breaks = torch.ones(n, dtype=torch.bool)
    breaks[1:] = (
        (trace.sequences[1:] != trace.sequences[:-1])
        | (trace.doc_ids[1:] != trace.doc_ids[:-1])
        | (trace.columns[1:] != trace.columns[:-1] + 1)
    )
    return torch.cumsum(breaks.long(), 0) - 1


def domain_nmi(trace: RoutingTrace, layer: int | str) -> float:
    """I(top-1 expert; domain) / H(domain) over the tokens with a domain label (papers.md C6)."""
    return m.normalized_mutual_information(trace.layer(layer).top1, trace.domains)


def domain_nmi_per_layer(trace: RoutingTrace) -> list[float]:
    """`domain_nmi` for every MoE layer, in depth order."""
    return [domain_nmi(trace, i) for i in range(trace.num_layers)]


def expert_domain_counts(trace: RoutingTrace, layer: int | str) -> Tensor:
    """[D, E]: chosen assignments (every slot, kept or dropped) per domain and expert."""
    lt = trace.layer(layer)
    domains = trace.domains[:, None].expand_as(lt.experts)
    return m.contingency(domains.reshape(-1), lt.experts.reshape(-1), trace.num_domains, lt.num_experts)


def default_cache_sizes(num_experts: int, limit: int = 16) -> list[int]:
    if num_experts <= limit:
        return list(range(1, num_experts + 1))
    return sorted({max(1, round(1 + i * (num_experts - 1) / (limit - 1))) for i in range(limit)})


def _finite(value: float) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def json_ready(value: Any) -> Any:
    """NaN and infinities become null (JSON has neither); tensors become lists; tuples lists."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, Tensor):
        return json_ready(value.tolist())
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def _load_section(layer: LayerTrace, options: HealthOptions) -> dict[str, Any]:
    load = layer.load()
    total = int(load.sum())
    return {
        "counts": load.tolist(),
        "share": [c / total if total else float("nan") for c in load.tolist()],
        "cv": m.coefficient_of_variation(load),
        "max_violation": m.max_violation(load),
        "dead": m.dead_experts(load),
        "overloaded": m.overloaded_experts(load, options.overload_factor),
    }


def _router_section(layer: LayerTrace) -> dict[str, Any]:
    entropy = layer.entropy.to(torch.float64)
    margin = layer.margin[torch.isfinite(layer.margin)].to(torch.float64)
    max_entropy = math.log(layer.num_experts) if layer.num_experts > 1 else float("nan")
    mean_entropy = float(entropy.mean()) if entropy.numel() else float("nan")
    quantiles = (
        torch.quantile(margin, torch.tensor([0.1, 0.5], dtype=torch.float64)) if margin.numel() else None
    )
    return {
        "entropy_mean": mean_entropy,
        "entropy_normalized": mean_entropy / max_entropy,
        "margin_mean": float(margin.mean()) if margin.numel() else float("nan"),
        "margin_p10": float(quantiles[0]) if quantiles is not None else float("nan"),
        "margin_median": float(quantiles[1]) if quantiles is not None else float("nan"),
        "experts_per_token": m.experts_per_token_histogram(layer.experts, layer.num_compute_experts),
    }


def _drop_section(trace: RoutingTrace, layer: LayerTrace, bin_width: int) -> dict[str, Any]:
    chosen = layer.experts >= 0
    num_chosen = int(chosen.sum())
    starts, rates, counts = m.drop_rate_by_position(layer.dropped, chosen, trace.positions, bin_width)
    return {
        "rate": int((layer.dropped & chosen).sum()) / num_chosen if num_chosen else float("nan"),
        "bin_width": bin_width,
        "by_position": {"starts": starts, "rates": rates, "chosen": counts},
    }


def _domain_section(trace: RoutingTrace, index: int) -> dict[str, Any] | None:
    if not bool((trace.domains >= 0).any()):
        return None
    counts = expert_domain_counts(trace, index)
    names = [trace.domain_name(d) for d in range(counts.shape[0])]
    top1 = m.top_expert_share(counts, 1).tolist()
    top2 = m.top_expert_share(counts, 2).tolist()
    return {
        "names": names,
        "counts": counts.tolist(),
        "nmi_top1": domain_nmi(trace, index),
        "nmi_top1_sqrt": m.normalized_mutual_information(trace.layer(index).top1, trace.domains, "sqrt"),
        "top1_share": dict(zip(names, top1, strict=True)),
        "top2_share": dict(zip(names, top2, strict=True)),
    }


def _purity_section(trace: RoutingTrace, layer: LayerTrace, options: HealthOptions) -> dict[str, Any]:
    top1 = layer.top1
    purity, coverage = m.label_purity(top1, trace.token_ids, options.purity_min_count)
    generator = torch.Generator().manual_seed(0)
    shuffled = top1[torch.randperm(top1.numel(), generator=generator)]
    shuffled_purity, _ = m.label_purity(shuffled, trace.token_ids, options.purity_min_count)
    domain_purity, _ = m.label_purity(top1, trace.domains, 1)
    return {
        "token_id_purity": purity,
        "token_id_coverage": coverage,
        "token_id_purity_shuffled": shuffled_purity,
        "domain_purity": domain_purity,
        "min_count": options.purity_min_count,
    }


def _consistency(
    layer: LayerTrace, runs: Tensor, options: HealthOptions, sizes: list[int]
) -> tuple[dict[str, Any], dict[int, Tensor]]:
    """SRP and SCH per window length, and the window-count histograms summed over experts."""
    chosen = m.multi_hot(layer.experts, layer.num_experts)
    kept = layer.experts.masked_fill(~layer.kept | (layer.experts >= layer.num_compute_experts), -1)
    sch_curves = segment_cache_curves(
        m.multi_hot(kept, layer.num_compute_experts), runs, options.segment_lengths
    )
    srp, thresholds, sch, histograms = {}, {}, {}, {}
    for length, rates in zip(options.segment_lengths, sch_curves, strict=True):
        histograms[length] = m.window_count_histogram(chosen, runs, length).sum(dim=0)
        srp[str(length)], thresholds[str(length)] = m.segment_routing_performance(histograms[length], length)
        sch[str(length)] = [rates[s - 1] for s in sizes]
    return {"srp": srp, "srp_threshold": thresholds, "sch": sch}, histograms


def layer_health(
    trace: RoutingTrace, index: int, options: HealthOptions | None = None, runs: Tensor | None = None
) -> dict[str, Any]:
    """Every per-layer metric of one MoE layer (values may be NaN; see `json_ready`)."""
    return _layer_health(trace, index, options or HealthOptions(), runs)[0]


def _layer_health(
    trace: RoutingTrace, index: int, options: HealthOptions, runs: Tensor | None
) -> tuple[dict[str, Any], dict[int, Tensor]]:
    layer = trace.layer(index)
    runs = token_runs(trace) if runs is None else runs
    max_position = int(trace.positions.max()) if trace.num_tokens else 0
    bin_width = options.position_bin or max(1, math.ceil((max_position + 1) / 32))
    sizes = options.cache_sizes or default_cache_sizes(layer.num_compute_experts)
    sizes = [s for s in sizes if s <= layer.num_compute_experts] or [layer.num_compute_experts]
    requests = request_stream(layer.experts, layer.kept, layer.num_compute_experts)
    consistency, histograms = _consistency(layer, runs, options, sizes)
    result = {
        "name": layer.name,
        "num_experts": layer.num_experts,
        "num_compute_experts": layer.num_compute_experts,
        "tokens": layer.num_tokens,
        "load": _load_section(layer, options),
        "router": _router_section(layer),
        "drops": _drop_section(trace, layer, bin_width),
        "domains": _domain_section(trace, index),
        "purity": _purity_section(trace, layer, options),
        "consistency": consistency,
        "cache": {
            "sizes": sizes,
            "requests": min(len(requests), options.max_cache_requests),
            "requests_total": len(requests),
            **hit_rate_curves(requests[: options.max_cache_requests], sizes),
        },
    }
    return result, histograms


def cross_layer_health(trace: RoutingTrace) -> list[dict[str, Any]]:
    """For each pair of consecutive MoE layers: how predictable the next layer's experts are."""
    pairs = []
    for i in range(trace.num_layers - 1):
        a, b = trace.layers[i], trace.layers[i + 1]
        chosen_a = m.multi_hot(a.experts, a.num_experts).sum(0)
        counts = m.coactivation_counts(a.experts, b.experts, a.num_experts, b.num_experts)
        pairs.append(
            {
                "layers": [a.name, b.name],
                "top1_nmi": m.normalized_mutual_information(a.top1, b.top1, "sqrt"),
                "top_partner_rate": m.top_partner_rate(counts, chosen_a),
            }
        )
    return pairs


def super_expert_health(trace: RoutingTrace, options: HealthOptions) -> dict[str, Any] | None:
    """The #42 detector over every layer that recorded expert output magnitudes."""
    recorded = [(i, layer) for i, layer in enumerate(trace.layers) if layer.activation_max is not None]
    if not recorded:
        return None
    values = []
    for _, layer in recorded:
        peak = layer.activation_max.to(torch.float64).clone()
        peak[layer.activation_token < 0] = torch.nan
        values.append(peak)
    q, frac = options.super_expert_quantile, options.super_expert_fraction
    above_quantile, above_fraction = super_expert_thresholds(values, q, frac)
    finite = torch.cat(values)
    finite = finite[torch.isfinite(finite)]
    median = float(finite.median()) if finite.numel() else float("nan")
    found = []
    for position, expert in find_super_experts(values, q, frac):
        index, layer = recorded[position]
        token = int(layer.activation_token[expert])
        value = float(values[position][expert])
        found.append(
            {
                "layer": layer.name,
                "layer_index": index,
                "expert": expert,
                "output_max": value,
                "ratio_to_median": value / median if median > 0 else float("nan"),
                "token_id": int(trace.token_ids[token]),
                "position": int(trace.positions[token]),
            }
        )
    return {
        "layers": [layer.name for _, layer in recorded],
        "output_max": [v.tolist() for v in values],
        "quantile": q,
        "threshold_quantile": above_quantile,
        "threshold_fraction_of_max": above_fraction,
        "median": median,
        "super_experts": found,
    }


def routing_health(trace: RoutingTrace, options: HealthOptions | None = None) -> dict[str, Any]:
    """The whole routing-health summary of a trace (NaN where undefined; `json_ready` for JSON)."""
    options = options or HealthOptions()
    runs = token_runs(trace)
    results = [_layer_health(trace, i, options, runs) for i in range(trace.num_layers)]
    layers = [result for result, _ in results]
    model_srp = {
        str(length): m.segment_routing_performance(torch.stack([h[length] for _, h in results]), length)[0]
        for length in options.segment_lengths
    }
    nmis = [layer["domains"]["nmi_top1"] for layer in layers if layer["domains"] is not None]
    summary = {
        "tokens": trace.num_tokens,
        "moe_layers": trace.num_layers,
        "mean_domain_nmi": sum(nmis) / len(nmis) if nmis else float("nan"),
        "max_load_cv": max((layer["load"]["cv"] for layer in layers), default=float("nan")),
        "dead_experts": sum(len(layer["load"]["dead"]) for layer in layers),
        "drop_rate": _mean([layer["drops"]["rate"] for layer in layers]),
        "srp": model_srp,
    }
    return {
        "format": HEALTH_FORMAT,
        "version": HEALTH_VERSION,
        "domains": [trace.domain_name(d) for d in range(trace.num_domains)],
        "options": asdict(options),
        "summary": summary,
        "layers": layers,
        "cross_layer": cross_layer_health(trace),
        "super_experts": super_expert_health(trace, options),
    }


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
