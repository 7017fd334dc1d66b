"""moekit.analysis: routing traces, routing-health metrics, expert-cache simulation, reports.

    from moekit.analysis import record_routing, routing_health, routing_health_sections, render_report
    trace = record_routing(model, batches)                 # any nn.Module with moekit MoE layers
    health = routing_health(trace)                         # JSON-ready after json_ready(...)
    render_report(routing_health_sections(trace, health), "out/report.html")

Names are imported on first use, like the rest of moekit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moekit.lazy_exports import lazy_getattr

_EXPORTS = {
    "RoutingRecorder": "moekit.analysis.recorder",
    "record_routing": "moekit.analysis.recorder",
    "default_forward": "moekit.analysis.recorder",
    "find_moe_layers": "moekit.analysis.recorder",
    "RoutingTrace": "moekit.analysis.trace",
    "LayerTrace": "moekit.analysis.trace",
    "load_trace": "moekit.analysis.trace",
    "HealthOptions": "moekit.analysis.health",
    "routing_health": "moekit.analysis.health",
    "domain_nmi": "moekit.analysis.health",
    "domain_nmi_per_layer": "moekit.analysis.health",
    "expert_domain_counts": "moekit.analysis.health",
    "json_ready": "moekit.analysis.health",
    "routing_drift": "moekit.analysis.drift",
    "find_super_experts": "moekit.analysis.super_experts",
    "hit_rate_curves": "moekit.analysis.cache",
    "segment_cache_hit_rates": "moekit.analysis.cache",
    "Section": "moekit.analysis.report",
    "Image": "moekit.analysis.report",
    "Table": "moekit.analysis.report",
    "Text": "moekit.analysis.report",
    "Html": "moekit.analysis.report",
    "figure_block": "moekit.analysis.report",
    "render_report": "moekit.analysis.report",
    "routing_health_sections": "moekit.analysis.report",
    "expert_domain_heatmap": "moekit.analysis.report",
    "expert_domain_heatmaps": "moekit.analysis.report",
    "load_bars": "moekit.analysis.report",
    "cache_curves": "moekit.analysis.report",
    "drift_plot": "moekit.analysis.report",
    "loss_curves": "moekit.analysis.report",
    "new_figure": "moekit.analysis.report",
    "analysis_batches": "moekit.analysis.data",
}

__all__ = [
    "HealthOptions",
    "Html",
    "Image",
    "LayerTrace",
    "RoutingRecorder",
    "RoutingTrace",
    "Section",
    "Table",
    "Text",
    "analysis_batches",
    "cache_curves",
    "default_forward",
    "domain_nmi",
    "domain_nmi_per_layer",
    "drift_plot",
    "expert_domain_counts",
    "expert_domain_heatmap",
    "expert_domain_heatmaps",
    "figure_block",
    "find_moe_layers",
    "find_super_experts",
    "hit_rate_curves",
    "json_ready",
    "load_bars",
    "load_trace",
    "loss_curves",
    "new_figure",
    "record_routing",
    "render_report",
    "routing_drift",
    "routing_health",
    "routing_health_sections",
    "segment_cache_hit_rates",
]

if TYPE_CHECKING:
    from moekit.analysis.cache import hit_rate_curves, segment_cache_hit_rates
    from moekit.analysis.data import analysis_batches
    from moekit.analysis.drift import routing_drift
    from moekit.analysis.health import (
        HealthOptions,
        domain_nmi,
        domain_nmi_per_layer,
        expert_domain_counts,
        json_ready,
        routing_health,
    )
    from moekit.analysis.recorder import RoutingRecorder, default_forward, find_moe_layers, record_routing
    from moekit.analysis.report import (
        Html,
        Image,
        Section,
        Table,
        Text,
        cache_curves,
        drift_plot,
        expert_domain_heatmap,
        expert_domain_heatmaps,
        figure_block,
        load_bars,
        loss_curves,
        new_figure,
        render_report,
        routing_health_sections,
    )
    from moekit.analysis.super_experts import find_super_experts
    from moekit.analysis.trace import LayerTrace, RoutingTrace, load_trace

__getattr__ = lazy_getattr(__name__, _EXPORTS)
