"""A self-contained HTML report: sections of text, tables and matplotlib figures (inline PNGs).

The routing-health sections come from `routing_health_sections(trace, health, drift)`; callers add
their own with the same blocks, e.g. the demo's training curves:

    sections = [Section("Training", [figure_block(loss_curves({"moe": (steps, losses)}))])]
    sections += routing_health_sections(trace, health)
    render_report(sections, out / "report.html", title="moekit demo")

Figures are built on `matplotlib.figure.Figure` directly (no pyplot, no global backend state).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moekit.analysis import metrics as m
from moekit.analysis.health import expert_domain_counts
from moekit.analysis.trace import RoutingTrace
from moekit.errors import MoekitError
from moekit.io import write_text_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_LAYER_PLOTS = 8


@dataclass(frozen=True)
class Image:
    """A PNG, base64-encoded, with a caption."""

    png_base64: str
    caption: str = ""


@dataclass(frozen=True)
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclass(frozen=True)
class Text:
    """Plain text (escaped); blank lines separate paragraphs."""

    text: str


@dataclass(frozen=True)
class Html:
    """Trusted HTML inserted as is."""

    html: str


Block = Image | Table | Text | Html


@dataclass(frozen=True)
class Section:
    title: str
    blocks: Sequence[Block] = field(default_factory=list)


# -- rendering -------------------------------------------------------------------------------------


def new_figure(width: float = 7.0, height: float = 3.6) -> Figure:
    """A matplotlib Figure not registered with pyplot (so nothing global is touched)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MoekitError("the HTML report needs matplotlib: pip install 'moekit[report]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def figure_block(figure: Figure, caption: str = "", dpi: int = 96) -> Image:
    """Render a matplotlib figure to an inline PNG block."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return Image(base64.b64encode(buffer.getvalue()).decode("ascii"), caption)


def format_value(value: Any) -> str:
    """Table cell text: floats to 4 significant digits, NaN/None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value) if value else "none"
    return str(value)


def _anchor(title: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    anchor, n = base, 2
    while anchor in used:
        anchor, n = f"{base}-{n}", n + 1
    used.add(anchor)
    return anchor


def _render_block(block: Block) -> str:
    if isinstance(block, Image):
        caption = f"<figcaption>{html.escape(block.caption)}</figcaption>" if block.caption else ""
        alt = html.escape(block.caption or "figure", quote=True)
        return f'<figure><img alt="{alt}" src="data:image/png;base64,{block.png_base64}">{caption}</figure>'
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block.headers)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(format_value(v))}</td>" for v in row) + "</tr>"
            for row in block.rows
        )
        caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Text):
        paragraphs = [p.strip() for p in block.text.split("\n\n") if p.strip()]
        return "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    if isinstance(block, Html):
        return block.html
    raise MoekitError(f"report: unknown block type {type(block).__name__}")


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:0.2em}.subtitle{color:#666;margin-top:0}
nav ul{columns:2;padding-left:1.2em}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;color:#555;padding-bottom:0.3em}
figure{margin:1em 0}figure img{max-width:100%}figcaption{color:#555;font-size:0.9em}
section{border-top:1px solid #ddd;margin-top:1.5em}
"""


def render_html(sections: Sequence[Section], title: str, subtitle: str = "") -> str:
    """The report as one HTML string with a table of contents; no external resources."""
    used: set[str] = set()
    anchors = [_anchor(s.title, used) for s in sections]
    toc = "".join(
        f'<li><a href="#{a}">{html.escape(s.title)}</a></li>' for a, s in zip(anchors, sections, strict=True)
    )
    body = "".join(
        f'<section id="{a}"><h2>{html.escape(s.title)}</h2>'
        + "".join(map(_render_block, s.blocks))
        + "</section>"
        for a, s in zip(anchors, sections, strict=True)
    )
    sub = f'<p class="subtitle">{html.escape(subtitle)}</p>' if subtitle else ""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{sub}"
        f"<nav><ul>{toc}</ul></nav>{body}</body></html>\n"
    )


def render_report(
    sections: Sequence[Section], path: Path, title: str = "moekit routing report", subtitle: str = ""
) -> Path:
    """Write the self-contained report to `path` atomically; returns the path."""
    path = Path(path)
    write_text_atomic(path, render_html(sections, title, subtitle))
    return path


# -- figures ---------------------------------------------------------------------------------------


def pick_layers(count: int, limit: int = MAX_LAYER_PLOTS) -> list[int]:
    """Up to `limit` layer indices spread evenly over `count` (first and last always included)."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def _grid(n: int, columns: int = 4, cell: tuple[float, float] = (3.2, 2.6)) -> tuple[Figure, list[Any]]:
    columns = min(columns, max(n, 1))
    rows = math.ceil(max(n, 1) / columns)
    figure = new_figure(cell[0] * columns, cell[1] * rows)
    axes = [figure.add_subplot(rows, columns, i + 1) for i in range(max(n, 1))]
    return figure, axes


def _draw_domain_heatmap(ax: Any, trace: RoutingTrace, layer: int | str) -> Any:
    counts = expert_domain_counts(trace, layer).to(torch.float64)
    totals = counts.sum(dim=1, keepdim=True)
    keep = totals.squeeze(1) > 0
    share = (counts / totals.clamp_min(1.0))[keep]
    names = [trace.domain_name(d) for d in range(counts.shape[0]) if keep[d]]
    image = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("expert", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    nmi = m.normalized_mutual_information(trace.layer(layer).top1, trace.domains)
    ax.set_title(f"{trace.layer(layer).name}  NMI {format_value(nmi)}", fontsize=9)
    return image


def expert_domain_heatmap(trace: RoutingTrace, layer: int | str) -> Figure:
    """Share of each domain's chosen assignments per expert (rows sum to 1) in one layer, titled
    with the layer's domain NMI."""
    num_experts = trace.layer(layer).num_experts
    figure = new_figure(max(4.0, 0.35 * num_experts + 2.5), max(2.2, 0.4 * trace.num_domains + 1.2))
    ax = figure.add_subplot()
    figure.colorbar(_draw_domain_heatmap(ax, trace, layer), ax=ax, label="share of domain")
    return figure


def expert_domain_heatmaps(trace: RoutingTrace, layers: Sequence[int] | None = None) -> Figure:
    """`expert_domain_heatmap` for several layers (default: up to 8, spread over depth) in one figure."""
    layers = pick_layers(trace.num_layers) if layers is None else list(layers)
    figure, axes = _grid(len(layers), columns=2, cell=(5.0, 0.4 * trace.num_domains + 1.4))
    for ax, index in zip(axes, layers, strict=False):
        figure.colorbar(_draw_domain_heatmap(ax, trace, index), ax=ax)
    return figure


def load_bars(trace: RoutingTrace, layers: Sequence[int] | None = None) -> Figure:
    """Each expert's share of the kept load per layer, with the uniform share as a line."""
    layers = pick_layers(trace.num_layers) if layers is None else list(layers)
    figure, axes = _grid(len(layers))
    for ax, index in zip(axes, layers, strict=False):
        layer = trace.layer(index)
        load = layer.load().to(torch.float64)
        share = load / load.sum().clamp_min(1.0)
        ax.bar(range(len(share)), share.numpy(), color="#4477aa")
        if len(share):
            ax.axhline(1.0 / len(share), color="#cc3311", linewidth=1, linestyle="--")
        ax.set_title(f"{layer.name}  CV {format_value(m.coefficient_of_variation(load))}", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
    return figure


def drop_rate_plot(health: Mapping[str, Any]) -> Figure:
    """Capacity drop rate against token position, one line per layer (OpenMoE's drop-towards-the-end)."""
    figure = new_figure(7.0, 3.2)
    ax = figure.add_subplot()
    for layer in health["layers"]:
        by_position = layer["drops"]["by_position"]
        ax.plot(by_position["starts"], _nan(by_position["rates"]), label=layer["name"], linewidth=1.2)
    ax.set_xlabel("position in document piece")
    ax.set_ylabel("dropped share of chosen")
    if len(health["layers"]) <= 12:
        _legend(ax, fontsize=7)
    return figure


def cache_curves(health: Mapping[str, Any], layers: Sequence[int] | None = None) -> Figure:
    """Hit rate against cache size per layer: LRU, LFU, Belady, and SCH (#52) per window length."""
    layers = pick_layers(len(health["layers"])) if layers is None else list(layers)
    figure, axes = _grid(len(layers))
    for ax, index in zip(axes, layers, strict=False):
        layer = health["layers"][index]
        cache = layer["cache"]
        for policy, label, style in (("lru", "LRU", "-o"), ("lfu", "LFU", "-s"), ("belady", "Belady", "-^")):
            if policy in cache:
                ax.plot(cache["sizes"], _nan(cache[policy]), style, markersize=3, label=label)
        for length, rates in layer["consistency"]["sch"].items():
            ax.plot(cache["sizes"], _nan(rates), ":", label=f"SCH L={length}")
        ax.set_ylim(0, 1.02)
        ax.set_title(layer["name"], fontsize=9)
        ax.set_xlabel("experts cached", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("hit rate", fontsize=8)
    _legend(axes[0], fontsize=6)
    return figure


def coactivation_heatmap(trace: RoutingTrace, layer_a: int, layer_b: int) -> Figure:
    """P(expert j in layer b | expert i in layer a) for two layers."""
    a, b = trace.layer(layer_a), trace.layer(layer_b)
    counts = m.coactivation_counts(a.experts, b.experts, a.num_experts, b.num_experts).to(torch.float64)
    active = m.multi_hot(a.experts, a.num_experts).sum(0).to(torch.float64)
    conditional = counts / active.clamp_min(1.0)[:, None]
    figure = new_figure(max(4.0, 0.3 * b.num_experts + 2.5), max(3.0, 0.3 * a.num_experts + 1.0))
    ax = figure.add_subplot()
    image = ax.imshow(conditional.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=1.0)
    ax.set_xlabel(f"expert in {b.name}")
    ax.set_ylabel(f"expert in {a.name}")
    figure.colorbar(image, ax=ax, label="P(next | this)")
    return figure


def super_expert_plot(super_health: Mapping[str, Any]) -> Figure:
    """output_max per (layer, expert) with the two #42 thresholds; super experts in red."""
    figure = new_figure(7.0, 3.2)
    ax = figure.add_subplot()
    flagged = {(s["layer_index"], s["expert"]) for s in super_health["super_experts"]}
    names = super_health["layers"]
    for position, values in enumerate(super_health["output_max"]):
        for expert, value in enumerate(values):
            if value is None or value != value:
                continue
            is_super = any(
                s["expert"] == expert and s["layer"] == names[position] for s in super_health["super_experts"]
            )
            ax.scatter(position, value, s=14, color="#cc3311" if is_super else "#4477aa")
    del flagged
    for key, style in (("threshold_quantile", "--"), ("threshold_fraction_of_max", ":")):
        value = super_health[key]
        if value is not None and value == value:
            ax.axhline(value, color="#555", linestyle=style, linewidth=1, label=key.replace("_", " "))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("max |expert output|")
    ax.set_yscale("log")
    _legend(ax, fontsize=7)
    return figure


def drift_plot(drift: Mapping[str, Any]) -> Figure:
    """Per layer: top-1 agreement, top-k Jaccard and token-map agreement between two traces."""
    figure = new_figure(7.0, 3.2)
    ax = figure.add_subplot()
    names = [layer["name"] for layer in drift["layers"]]
    for key in ("top1_agreement", "topk_jaccard", "token_map_agreement"):
        ax.plot(
            range(len(names)),
            _nan([layer[key] for layer in drift["layers"]]),
            "-o",
            label=key.replace("_", " "),
        )
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1.02)
    _legend(ax, fontsize=7)
    return figure


def loss_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "loss",
    log_y: bool = False,
) -> Figure:
    """One line per named (x, y) series, e.g. {"moe": (steps, val_loss), "dense": (...)}."""
    figure = new_figure(7.0, 3.6)
    ax = figure.add_subplot()
    for name, (xs, ys) in curves.items():
        ax.plot(list(xs), _nan(list(ys)), label=name, linewidth=1.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    _legend(ax, fontsize=8)
    return figure


def _legend(ax: Any, fontsize: int) -> None:
    """A legend only when something is labelled (matplotlib warns otherwise)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def _nan(values: Sequence[Any]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


# -- the routing-health sections -------------------------------------------------------------------


def _per_layer(health: Mapping[str, Any], *paths: str) -> list[list[Any]]:
    """Rows [layer name, value at each dotted path] over the layers of a health summary."""

    def get(layer: Mapping[str, Any], path: str) -> Any:
        value: Any = layer
        for key in path.split("."):
            value = None if value is None else value.get(key)
        return value

    return [[layer["name"], *(get(layer, p) for p in paths)] for layer in health["layers"]]


def summary_section(health: Mapping[str, Any]) -> Section:
    summary = health["summary"]
    headers = ["layer", "load CV", "MaxVio", "dead", "overloaded", "entropy / log E", "median margin"]
    headers += ["drop rate", "domain NMI", "token-id purity", "SRP@16"]
    rows = []
    for layer in health["layers"]:
        srp = layer["consistency"]["srp"]
        rows.append(
            [
                layer["name"],
                layer["load"]["cv"],
                layer["load"]["max_violation"],
                len(layer["load"]["dead"]),
                len(layer["load"]["overloaded"]),
                layer["router"]["entropy_normalized"],
                layer["router"]["margin_median"],
                layer["drops"]["rate"],
                (layer["domains"] or {}).get("nmi_top1"),
                layer["purity"]["token_id_purity"],
                srp.get("16"),
            ]
        )
    text = (
        f"{summary['tokens']} tokens through {summary['moe_layers']} MoE layers. Load counts the assignments "
        "each compute expert processed; domain statistics count every chosen assignment; domain NMI is "
        "I(top-1 expert; domain) / H(domain)."
    )
    return Section("Summary", [Text(text), Table(headers, rows, "One row per MoE layer.")])


def domain_section(trace: RoutingTrace, health: Mapping[str, Any]) -> Section | None:
    labelled = [layer for layer in health["layers"] if layer["domains"]]
    if not labelled:
        return None
    names = labelled[0]["domains"]["names"]
    rows = [
        [layer["name"], layer["domains"]["nmi_top1"], *layer["domains"]["top1_share"].values()]
        for layer in labelled
    ]
    heatmaps = figure_block(expert_domain_heatmaps(trace), "Share of each domain's assignments per expert.")
    return Section(
        "Experts by domain", [heatmaps, Table(["layer", "NMI", *(f"top-1 share {n}" for n in names)], rows)]
    )


def load_section(trace: RoutingTrace, health: Mapping[str, Any]) -> Section:
    factor = health["options"]["overload_factor"]
    table = Table(
        ["layer", "dead experts", f"overloaded (> {factor:g}x mean)", "tokens choosing 0, 1, ... experts"],
        _per_layer(health, "load.dead", "load.overloaded", "router.experts_per_token"),
    )
    bars = figure_block(load_bars(trace), "Share of the kept load per expert; dashed: uniform.")
    return Section("Expert load", [bars, table])


def confidence_section(health: Mapping[str, Any]) -> Section:
    paths = ("entropy_mean", "entropy_normalized", "margin_mean", "margin_p10", "margin_median")
    table = Table(
        ["layer", "entropy (nats)", "entropy / log E", "margin mean", "margin p10", "margin median"],
        _per_layer(health, *(f"router.{p}" for p in paths)),
        "Margin: the weakest chosen minus the strongest unchosen routing probability.",
    )
    return Section("Router confidence", [table])


def drop_section(health: Mapping[str, Any]) -> Section:
    if any((layer["drops"]["rate"] or 0) > 0 for layer in health["layers"]):
        blocks: list[Block] = [figure_block(drop_rate_plot(health), "Drop rate by position (OpenMoE, #56).")]
    else:
        blocks = [
            Text("No assignment was dropped by capacity (dropless routing, or capacity never reached).")
        ]
    return Section("Capacity drops by position", blocks)


def purity_section(health: Mapping[str, Any]) -> Section:
    text = (
        "Token-id purity is the share of tokens routed (top-1) to their token id's majority expert, over ids "
        "seen at least twice (OpenMoE, #56). Compare it with the same statistic on shuffled routing (chance "
        "for these id frequencies) and with the domain label as predictor."
    )
    paths = ("token_id_purity", "token_id_purity_shuffled", "token_id_coverage", "domain_purity")
    table = Table(
        ["layer", "token-id purity", "shuffled", "coverage", "domain purity"],
        _per_layer(health, *(f"purity.{p}" for p in paths)),
    )
    return Section("Token ids or context?", [Text(text), table])


def coactivation_section(trace: RoutingTrace, health: Mapping[str, Any]) -> Section | None:
    pairs = health["cross_layer"]
    if not pairs:
        return None
    table = Table(
        ["layers", "top-1 NMI", "top-partner rate"],
        [[" → ".join(p["layers"]), p["top1_nmi"], p["top_partner_rate"]] for p in pairs],
        "Top-partner rate: mean over experts of max_j P(expert j in the next layer | this expert).",
    )
    heatmap = figure_block(
        coactivation_heatmap(trace, 0, 1), f"Co-activation {' → '.join(pairs[0]['layers'])}."
    )
    return Section("Cross-layer co-activation", [table, heatmap])


def consistency_section(health: Mapping[str, Any]) -> Section:
    lengths = [str(n) for n in health["options"]["segment_lengths"]]
    text = (
        "SRP (#52): the best F1 of predicting an expert active on a whole window of L tokens from how "
        "many of them use it; 1 = routing constant within windows. Cache curves: hit rate of a per-layer "
        "expert cache against its size for LRU, LFU, the Belady optimum, and the SCH prefetching oracle "
        "over the next L tokens."
    )
    rows = _per_layer(health, *(f"consistency.srp.{n}" for n in lengths))
    rows.append(["model", *(health["summary"]["srp"][n] for n in lengths)])
    table = Table(["layer", *(f"SRP@{n}" for n in lengths)], rows)
    curves = figure_block(cache_curves(health), "Expert-cache hit rate against cache size.")
    return Section("Local routing consistency and expert caching", [Text(text), table, curves])


def super_expert_section(health: Mapping[str, Any]) -> Section | None:
    found = health.get("super_experts")
    if not found:
        return None
    text = (
        "Max |expert output| per (layer, expert) over the recorded tokens. Super experts (#42) exceed both "
        "the 99.5th percentile of all values and a tenth of the largest; the largest always passes both "
        "when it is unique, so read its ratio to the median."
    )
    keys = ("layer", "expert", "output_max", "ratio_to_median", "token_id", "position")
    table = Table(
        ["layer", "expert", "output max", "× median", "token id", "position"],
        [[s[k] for k in keys] for s in found["super_experts"]],
    )
    return Section("Super experts", [Text(text), figure_block(super_expert_plot(found)), table])


def drift_section(drift: Mapping[str, Any]) -> Section:
    keys = ("top1_agreement", "topk_jaccard", "token_map_agreement", "load_js_divergence")
    keys += ("domain_nmi_a", "domain_nmi_b")
    table = Table(
        ["layer", "top-1 agreement", "top-k Jaccard", "token-map agreement", "load JS", "NMI a", "NMI b"],
        [[d["name"], *(d[k] for k in keys)] for d in drift["layers"]],
    )
    text = Text(f"{drift.get('a') or 'model a'} against {drift.get('b') or 'model b'} on the same tokens.")
    return Section("Routing drift", [text, figure_block(drift_plot(drift)), table])


def routing_health_sections(
    trace: RoutingTrace, health: Mapping[str, Any], drift: Mapping[str, Any] | None = None
) -> list[Section]:
    """The standard routing-health report sections for a trace and its `routing_health` summary."""
    sections = [
        summary_section(health),
        domain_section(trace, health),
        load_section(trace, health),
        confidence_section(health),
        drop_section(health),
        purity_section(health),
        coactivation_section(trace, health),
        consistency_section(health),
        super_expert_section(health),
        drift_section(drift) if drift is not None else None,
    ]
    return [s for s in sections if s is not None]
