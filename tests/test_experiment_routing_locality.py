"""`moekit experiment routing-locality` (#52): locality measures against hand-made traces, the
arms' configs, the verdict rules on made-up runs, and the quick path end to end."""

import json
from pathlib import Path

import pytest
import torch

from moekit import cli
from moekit.analysis.trace import LayerTrace, RoutingTrace
from moekit.experiments import routing_locality, runner
from moekit.experiments.stats import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


def trace_of(experts: torch.Tensor, tokens_per_doc: int) -> RoutingTrace:
    n = len(experts)
    layer = LayerTrace(
        "l0", 8, 8, experts, torch.full(experts.shape, 0.5), torch.zeros(experts.shape, dtype=torch.bool),
        torch.zeros(n), torch.zeros(n),
    )  # fmt: skip
    index = torch.arange(n)
    docs = index // tokens_per_doc
    return RoutingTrace(
        index % 50, index % tokens_per_doc, index % tokens_per_doc, docs, docs, docs % 2, [layer], ("a", "b")
    )


def test_constant_routing_is_perfectly_local_and_cached():
    # every document of 32 tokens keeps the same two experts: SRP 1, every cache of 2k serves all
    experts = torch.tensor([[2 * (d % 4), 2 * (d % 4) + 1] for d in range(8) for _ in range(32)])
    measures = routing_locality.locality(trace_of(experts, 32))
    assert measures["srp"] == [pytest.approx(1.0)]
    assert measures["sch_2k"] == [pytest.approx(1.0)] and measures["sch_all"] == [pytest.approx(1.0)]
    # LRU of 4 experts misses only the first request of each expert per document: 2 per 64 requests
    assert measures["lru_2k"] == [pytest.approx(1 - 2 / 64)]
    assert measures["belady_2k"][0] >= measures["lru_2k"][0]


def test_random_routing_is_not_local():
    generator = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(256)])
    measures = routing_locality.locality(trace_of(experts, 32))
    assert measures["srp"][0] < 0.6
    assert measures["sch_2k"][0] < measures["sch_all"][0]
    assert measures["lru_2k"][0] == pytest.approx(
        4 / 8, abs=0.1
    )  # a random 2-of-8 hits a 4-cache half the time


def test_arms_differ_in_the_shared_expert_or_the_scope_only():
    settings = runner.ExperimentSettings(out_dir=Path("unused"))
    configs = {
        a: routing_locality.run_config(a, routing_locality.FULL, 0, settings) for a in routing_locality.ARMS
    }
    assert configs["shared"]["model"]["moe"]["num_shared_experts"] == 1
    assert "num_shared_experts" not in configs["global"]["model"]["moe"]
    scopes = {a: c["balance"]["objectives"][0]["scope"] for a, c in configs.items()}
    assert scopes == {"global": "global", "shared": "global", "micro_batch": "micro_batch"}
    for config in configs.values():
        assert config["data"]["single_domain_batches"] and config["data"]["stream"] == "sequential"


def fake_runs(srp: dict[str, list[float]], sch_2k: float = 0.9) -> dict:
    return {
        arm: [
            {"seed": i, "val_loss": {"mean": 2.0}, "srp": [v, v], "sch_2k": [sch_2k + 0.001 * i] * 2,
             "sch_all": [1.0, 1.0], "lru_2k": [0.5, 0.5], "belady_2k": [0.6, 0.6]}
            for i, v in enumerate(values)
        ]
        for arm, values in srp.items()
    }  # fmt: skip


def test_verdicts_follow_the_seed_paired_intervals():
    good = fake_runs(
        {"global": [0.8, 0.82, 0.81], "shared": [0.6, 0.61, 0.6], "micro_batch": [0.5, 0.52, 0.5]}
    )
    outcome = routing_locality.outcome(good, routing_locality.QUICK, 3)
    assert [c.verdict for c in outcome.checks] == [REPRODUCED] * 3
    bad = fake_runs(
        {"global": [0.5, 0.52, 0.5], "shared": [0.6, 0.61, 0.6], "micro_batch": [0.8, 0.8, 0.82]}, 0.5
    )
    assert [c.verdict for c in routing_locality.outcome(bad, routing_locality.QUICK, 3).checks] == [
        NOT_REPRODUCED
    ] * 3
    noisy = fake_runs({"global": [0.8, 0.5, 0.7], "shared": [0.6, 0.7, 0.6], "micro_batch": [0.5, 0.52, 0.5]})
    assert routing_locality.outcome(noisy, routing_locality.QUICK, 3).checks[0].verdict == INCONCLUSIVE


def test_quick_run_end_to_end(tmp_path):
    assert (
        cli.main(["experiment", "routing-locality", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["experiment"] == "routing-locality" and len(results["checks"]) == 3
    for arm in routing_locality.ARMS:
        for run in results["results"]["runs"][arm]:
            assert len(run["srp"]) == routing_locality.QUICK.layers
            assert all(0 < v <= 1 for v in run["srp"] + run["sch_2k"] + run["lru_2k"])
            assert all(s2 <= sa + 1e-9 for s2, sa in zip(run["sch_2k"], run["sch_all"], strict=True))
            assert all(lru <= b + 1e-9 for lru, b in zip(run["lru_2k"], run["belady_2k"], strict=True))
    assert "Local routing consistency" in (tmp_path / "report.html").read_text()
