"""`moekit experiment token-vs-context`: OpenMoE's three routing findings (Xue et al. 2024, #56),
with DeepSpeed-MoE's fix for the third (random token selection, #21).

1. Context-independent specialisation: a token's expert is predicted better by its token id than
   by its domain. Token-id purity (the share of tokens routed to their id's majority top-1 expert,
   ids seen at least twice) against domain purity (the same with the domain as the label), per layer.
2. Early routing learning: the token-id -> expert map is fixed early. Jaccard overlap of the maps
   (as sets of (id, expert) pairs) between the checkpoint at 10% of training and the final one.
3. Drop towards the end: with capacity factor 1.0 and position priority, later tokens of a sequence
   are dropped more often; random token selection (RTS) makes the drop rate flat in position.
   Measured on the final model with capacity applied per sequence (one row per forward pass, so
   the priority order is the position in the sequence): the drop rate of the last quarter of
   positions minus that of the first quarter, under each policy.

The model trains dropless; capacity is switched on only for the drop measurement. Every figure is
a mean over seeds with a Student-t interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from moekit.experiments.runner import Check, ExperimentSettings, Outcome
from moekit.experiments.stats import combine_verdicts, mean_estimate, verdict_at_least, verdict_at_most
from moekit.experiments.training import (
    ArmScale,
    arm_config,
    build_trainer,
    moe_model,
    scale_and_seeds,
    validation_batches,
)

REQUIRES = ("scipy", "matplotlib")
CLAIM = (
    "Routing follows token ids more than context and is learnt early (OpenMoE #56: token-id purity "
    "> 0.7 in early layers, above a domain predictor; token->expert maps of the 10% and final "
    "checkpoints overlap > 0.8), and with capacity factor 1.0 later tokens are dropped more "
    "(#56 Drop-towards-the-End) unless tokens are kept in random order (#21 RTS: flat in position)."
)
EARLY_FRACTION = 0.1
TOKEN_PURITY = 0.7
MAP_OVERLAP = 0.8
DROP_RISE = 0.02  # late - early drop rate that counts as "rising" (2 percentage points)
FLAT = 0.02  # |late - early| drop rate that counts as "flat"
POLICIES = ("position", "random")
CAPACITY_FACTOR = 1.0
PURITY_MIN_COUNT = 2

QUICK = ArmScale("sample", 64, 2, 2, 64, 8, 64, 8, 1, 40, 3e-3, 2, 2)
FULL = ArmScale("builtin", 128, 2, 2, 128, 8, 128, 16, 1, 300, 3e-3, 8, 3)


def run_config(scale: ArmScale, seed: int, settings: ExperimentSettings) -> dict[str, Any]:
    return arm_config(
        "top2",
        seed,
        scale,
        settings,
        model=moe_model(scale),
        objectives=[
            {"kind": "load_balance", "scope": "global", "coefficient": 0.01},
            {"kind": "z_loss", "scope": "global", "coefficient": 0.001},
        ],
    )


@contextmanager
def capacity(model: torch.nn.Module, factor: float, policy: str) -> Iterator[None]:
    """Every MoE router of `model` under capacity `factor` and drop `policy` (restored on exit)."""
    from moekit.analysis import find_moe_layers

    routers = [moe.router for _, moe in find_moe_layers(model)]
    saved = [router.spec for router in routers]
    try:
        for router in routers:
            router.spec = replace(router.spec, capacity_factor=factor, drop_policy=policy)
        yield
    finally:
        for router, spec in zip(routers, saved, strict=True):
            router.spec = spec


def purities(trace: Any) -> dict[str, list[float]]:
    """Per layer: token-id purity and domain purity of the top-1 expert."""
    from moekit.analysis import metrics as m

    token, domain = [], []
    for layer in trace.layers:
        token.append(m.label_purity(layer.top1, trace.token_ids, PURITY_MIN_COUNT)[0])
        domain.append(m.label_purity(layer.top1, trace.domains, PURITY_MIN_COUNT)[0])
    return {"token_purity": token, "domain_purity": domain}


def map_overlap(early: Any, final: Any) -> list[float]:
    """Per layer: Jaccard overlap of the token-id -> majority expert maps of two traces of the
    same tokens."""
    from moekit.analysis import metrics as m

    return [
        m.token_map_agreement(a.top1, b.top1, early.token_ids, PURITY_MIN_COUNT)[1]
        for a, b in zip(early.layers, final.layers, strict=True)
    ]


def late_minus_early(trace: Any, seq_len: int) -> dict[str, Any]:
    """Drop rate by position (in quarters of the sequence), pooled over layers, and the last
    quarter's rate minus the first's."""
    from moekit.analysis import metrics as m

    width = max(1, seq_len // 4)
    dropped = torch.cat([layer.dropped for layer in trace.layers])
    chosen = torch.cat([layer.experts >= 0 for layer in trace.layers])
    positions = trace.columns.repeat(trace.num_layers)
    _, rates, counts = m.drop_rate_by_position(dropped, chosen, positions, width)
    return {"rates": rates, "assignments": counts, "late_minus_early": rates[-1] - rates[0]}


def record(model: Any, batches: list[Any], domains: tuple[str, ...]) -> Any:
    from moekit.analysis import record_routing

    return record_routing(model, batches, domain_names=domains)


def run(settings: ExperimentSettings, log: Callable[[str], None] = print) -> Outcome:
    from moekit.data.lmdata import prepare_data

    scale, seeds = scale_and_seeds(settings, QUICK, FULL, "token-vs-context")
    data = prepare_data(scale.source, log=log)
    batches = validation_batches(data, scale)
    rows = validation_batches(data, scale, rows=1, per_domain=scale.eval_batches * scale.micro_batch // 2)
    early_steps = max(1, math.ceil(EARLY_FRACTION * scale.steps))
    runs = []
    for seed in range(seeds):
        trainer = build_trainer(run_config(scale, seed, settings), data, log)
        trainer.run(max_steps=early_steps)
        early = record(trainer.model, batches, data.domains)
        trainer.run()
        final = record(trainer.model, batches, data.domains)
        drops = {}
        for policy in POLICIES:
            torch.manual_seed(seed)  # RTS draws its order from torch's generator
            with capacity(trainer.model, CAPACITY_FACTOR, policy):
                drops[policy] = late_minus_early(record(trainer.model, rows, data.domains), scale.seq_len)
        entry = {
            "seed": seed,
            "early_step": early_steps,
            **purities(final),
            "early_token_purity": purities(early)["token_purity"],
            "map_overlap": map_overlap(early, final),
            "drops": drops,
        }
        runs.append(entry)
        log(
            f"seed {seed}: token-id purity {_fmt(entry['token_purity'])}, domain purity "
            f"{_fmt(entry['domain_purity'])}, map overlap {_fmt(entry['map_overlap'])}, late - early drop "
            + ", ".join(f"{p} {drops[p]['late_minus_early']:+.3f}" for p in POLICIES)
        )
    return outcome(runs, scale, seeds)


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def outcome(runs: list[dict[str, Any]], scale: ArmScale, seeds: int) -> Outcome:
    """The checks from the recorded runs (pure: the tests feed it made-up runs)."""
    gap = mean_estimate([np.mean(r["token_purity"]) - np.mean(r["domain_purity"]) for r in runs])
    first = mean_estimate([r["token_purity"][0] for r in runs])
    overlap = mean_estimate([np.mean(r["map_overlap"]) for r in runs])
    rise = mean_estimate([r["drops"]["position"]["late_minus_early"] for r in runs])
    flat = mean_estimate([r["drops"]["random"]["late_minus_early"] for r in runs])
    checks = [
        Check(
            "token id predicts the expert better than the domain: token-id - domain purity, mean of layers",
            gap,
            "95% CI lower bound >= 0",
            verdict_at_least(gap, 0.0),
        ),
        Check(
            "token-id purity of the first MoE layer",
            first,
            f"95% CI lower bound >= {TOKEN_PURITY}",
            verdict_at_least(first, TOKEN_PURITY),
            paper="> 0.7 in early layers (#56, small-scale test)",
        ),
        Check(
            f"routing learnt early: Jaccard of token->expert maps, {EARLY_FRACTION:.0%} vs final checkpoint",
            overlap,
            f"95% CI lower bound >= {MAP_OVERLAP}",
            verdict_at_least(overlap, MAP_OVERLAP),
            paper="> 0.8 (#56, small-scale test)",
        ),
        Check(
            "drop towards the end, position priority, capacity 1.0: last - first quarter drop rate",
            rise,
            f"95% CI lower bound >= {DROP_RISE}",
            verdict_at_least(rise, DROP_RISE),
            paper="later tokens dropped more (#56)",
        ),
        Check(
            "RTS is flat in position: last - first quarter drop rate under random priority",
            flat,
            f"95% CI within [-{FLAT}, {FLAT}]",
            combine_verdicts([verdict_at_most(flat, FLAT), verdict_at_least(flat, -FLAT)]),
            paper="RTS removes the position bias (#21)",
        ),
    ]
    layers = len(runs[0]["token_purity"])

    def per_layer(key: str) -> list[float]:
        return [float(np.mean([r[key][i] for r in runs])) for i in range(layers)]

    summary = {
        "token_purity": per_layer("token_purity"),
        "domain_purity": per_layer("domain_purity"),
        "early_token_purity": per_layer("early_token_purity"),
        "map_overlap": per_layer("map_overlap"),
        "drop_rate_by_quarter": {
            p: np.mean([r["drops"][p]["rates"] for r in runs], axis=0).tolist() for p in POLICIES
        },
    }
    results = {
        "scale": scale.__dict__,
        "seeds": seeds,
        "capacity_factor": CAPACITY_FACTOR,
        "runs": runs,
        "summary": summary,
    }
    return Outcome(CLAIM, checks, results, _sections(results))


def _sections(results: dict[str, Any]) -> list[Any]:
    from moekit.analysis import Section, Table, Text

    s = results["summary"]
    purity = Table(
        ["layer", "token-id purity", "domain purity", "token-id purity at 10%", "map overlap 10% vs final"],
        [
            [i, f"{t:.3f}", f"{d:.3f}", f"{e:.3f}", f"{o:.3f}"]
            for i, (t, d, e, o) in enumerate(
                zip(
                    s["token_purity"],
                    s["domain_purity"],
                    s["early_token_purity"],
                    s["map_overlap"],
                    strict=True,
                )
            )
        ],
        caption=f"final checkpoint unless stated; means over {results['seeds']} seeds",
    )
    drops = Table(
        ["priority", "1st quarter", "2nd quarter", "3rd quarter", "4th quarter"],
        [[p, *[f"{v:.3f}" for v in rates]] for p, rates in s["drop_rate_by_quarter"].items()],
        caption=f"share of chosen assignments dropped at capacity factor {results['capacity_factor']}, "
        "capacity per sequence, by position in the sequence, pooled over layers",
    )
    text = Text(
        "Purity: the share of tokens whose top-1 expert is the majority expert of their label (token "
        "id or domain; labels seen at least twice). The model trains dropless; capacity is applied "
        "only to measure drops."
    )
    return [Section("Token ids vs context", [text, purity, drops])]
