"""The demo's report: the dense-vs-MoE comparison, then moekit's routing-health sections for the MoE.

Built from the analysis package's pieces (recorder, NMI, heatmaps, HTML), so that `moekit analyze`
and the demo draw the same plots from the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moekit.analysis import (
    Section,
    Table,
    Text,
    domain_nmi_per_layer,
    figure_block,
    json_ready,
    loss_curves,
    record_routing,
    render_report,
    routing_health,
    routing_health_sections,
)
from moekit.demo import SEED_MARGIN
from moekit.io import write_json_atomic
from moekit.train.metrics import read_metrics


def validation_batches(data: Any, seq_len: int, batch_size: int, per_domain: int) -> list[Any]:
    """`per_domain` validation batches of every domain, interleaved domain by domain."""
    streams = [
        iter(data.eval_batches(d, "validation", batch_size=batch_size, seq_len=seq_len)) for d in data.domains
    ]
    batches = []
    for _ in range(per_domain):
        for stream in streams:
            batch = next(stream, None)
            if batch is not None:
                batches.append(batch)
    return batches


def _series(records: list[dict[str, Any]], key: str, window: int = 1) -> tuple[list[float], list[float]]:
    """(tokens in millions, value) for every record that has `key`, as a trailing moving average
    over `window` records (training batches differ a lot by domain; the average shows the trend)."""
    points = [(r["tokens"], r[key]) for r in records if r.get(key) is not None]
    values = [p[1] for p in points]
    smoothed = [
        sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
        for i in range(len(values))
    ]
    return [p[0] / 1e6 for p in points], smoothed


def equal_time_losses(out_dir: Path, results: Mapping[str, Any]) -> dict[str, Any]:
    """Each model's mean validation loss at the training time the faster one needed for all its
    tokens, interpolated along its validation curve (time = tokens / its tokens per second)."""
    curves = {}
    for name in ("dense", "moe"):
        records = [r for r in read_metrics(out_dir / name / "metrics.jsonl") if r.get("val/mean") is not None]
        seconds = [r["tokens"] / results[name]["tokens_per_s"] for r in records]
        curves[name] = (seconds, [r["val/mean"] for r in records])
    budget = min(curves[name][0][-1] for name in curves if curves[name][0])
    losses = {name: float(np.interp(budget, *curves[name])) for name in curves}
    return {"seconds": budget, **losses}


def comparison_sections(out_dir: Path, results: Mapping[str, Any], domains: tuple[str, ...]) -> list[Section]:
    dense, moe = results["dense"], results["moe"]
    gain = dense["val_loss"]["mean"] - moe["val_loss"]["mean"]
    ratio = moe["tokens_per_s"] / dense["tokens_per_s"]
    shown = "shows it" if gain > 0 else "does not show it"
    headline = Text(
        "Claim (the seed papers): an MoE reaches a lower loss than a dense model with the same active "
        f"parameters trained on the same tokens. This run {shown}: mean validation loss "
        f"{moe['val_loss']['mean']:.4f} (MoE) vs {dense['val_loss']['mean']:.4f} (dense) nats per byte, "
        f"MoE - dense {-gain:+.4f}, with the same active parameters "
        f"({moe['parameters']['active'] / 1e6:.2f}M vs {dense['parameters']['active'] / 1e6:.2f}M; "
        f"the MoE holds {moe['parameters']['total'] / 1e6:.2f}M in total). It trained at "
        f"{moe['tokens_per_s']:,.0f} tokens/s, {ratio:.2f}x the dense model's {dense['tokens_per_s']:,.0f}. "
        f"One seed: `moekit demo --seeds 0 1 2` tests whether the gain is at least {SEED_MARGIN} nats per "
        "byte on every seed and more than twice the seed-to-seed spread."
    )
    blocks: list[Any] = [headline]
    timed = results.get("equal_time")
    if timed:
        timed_gain = timed["dense"] - timed["moe"]
        blocks.append(
            Text(
                f"At equal training time ({timed['seconds']:.0f} s, what the faster model needed for all its "
                f"tokens; losses read off each validation curve): MoE {timed['moe']:.4f} vs dense "
                f"{timed['dense']:.4f}, so at equal time this run "
                f"{'shows the MoE ahead' if timed_gain > 0 else 'does not show the MoE ahead'} "
                f"(MoE - dense {-timed_gain:+.4f})."
            )
        )
    rows = []
    for domain in (*domains, "mean"):
        d, m = dense["val_loss"].get(domain), moe["val_loss"].get(domain)
        if d is None or m is None:
            continue
        rows.append([domain, f"{d:.4f}", f"{m:.4f}", f"{m - d:+.4f}"])
    table = Table(["domain", "dense", "MoE", "MoE - dense"], rows)
    curves = {}
    val_curves = {}
    for name in ("dense", "moe"):
        records = read_metrics(out_dir / name / "metrics.jsonl")
        curves[name] = _series(records, "train/lm_loss", window=10)
        val_curves[name] = _series(records, "val/mean")
    figures = [
        figure_block(
            loss_curves(curves, "training loss", xlabel="tokens (M)"),
            "next-token loss of the training batches, moving average over 10 logged steps",
        ),
        figure_block(loss_curves(val_curves, "validation loss", xlabel="tokens (M)"), "mean over domains"),
    ]
    nmi = moe.get("domain_nmi", [])
    nmi_text = Text(
        "Normalised mutual information between a token's top-1 expert and its domain, per MoE layer "
        "(0: routing ignores the domain, 1: every domain has its own experts): "
        + ", ".join(f"layer {i}: {v:.3f}" for i, v in enumerate(nmi))
        + ". The model never sees the domain labels."
    )
    return [
        Section("Dense vs MoE", [*blocks, table, *figures]),
        Section("Experts specialise by domain", [nmi_text]),
    ]


def analyse_and_report(
    settings: Any,
    data: Any,
    trainers: Mapping[str, Any],
    results: Mapping[str, Any],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Record the MoE's routing on validation text, compute per-layer domain NMI, write the report."""
    moe = trainers["moe"].model
    batches = validation_batches(data, settings.seq_len, settings.micro_batch_size, per_domain=4)
    trace = record_routing(moe, batches, domain_names=data.domains)
    nmi = domain_nmi_per_layer(trace)
    health = routing_health(trace)
    write_json_atomic(settings.out_dir / "routing_health.json", json_ready(health))
    merged = {name: dict(value) for name, value in results.items()}
    merged["moe"]["domain_nmi"] = nmi
    sections = comparison_sections(settings.out_dir, merged, data.domains)
    sections += routing_health_sections(trace, health)
    render_report(
        sections,
        settings.out_dir / "report.html",
        title="moekit demo: dense vs MoE on the built-in corpus",
        subtitle=f"{len(data.domains)} domains: {', '.join(data.domains)}",
    )
    shown = ", ".join(f"{v:.3f}" for v in nmi)
    log(f"routing recorded on {len(batches)} validation batches; domain NMI per layer: {shown}")
    return {"domain_nmi": nmi}
