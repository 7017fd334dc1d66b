"""`moekit experiment balance-scope` (#53): the routing measures against hand-made traces, the
verdict rules on made-up runs, arms that differ only in the scope, and the quick path end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit import cli
from moekit.analysis.trace import LayerTrace, RoutingTrace
from moekit.experiments import balance_scope, runner
from moekit.experiments.stats import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


def hand_trace(experts: list[list[int]], domains: list[int], num_experts: int = 4) -> RoutingTrace:
    n = len(experts)
    chosen = torch.tensor(experts, dtype=torch.long)
    layer = LayerTrace(
        "layer0",
        num_experts,
        num_experts,
        chosen,
        torch.full(chosen.shape, 0.5),
        torch.zeros(chosen.shape, dtype=torch.bool),
        torch.zeros(n),
        torch.zeros(n),
    )
    arange = torch.arange(n)
    return RoutingTrace(
        token_ids=arange % 7,
        positions=arange,
        columns=arange,
        sequences=torch.zeros(n, dtype=torch.long),
        doc_ids=torch.tensor(domains),
        domains=torch.tensor(domains),
        layers=[layer],
        domain_names=("code", "math"),
    )


def test_routing_measures_of_a_fully_specialised_and_a_domain_blind_routing():
    specialised = hand_trace([[0, 1], [1, 0], [2, 3], [3, 2]] * 5, [0, 0, 1, 1] * 5)
    measures = balance_scope.routing_measures(specialised)
    assert measures["nmi"] == [pytest.approx(1.0)]
    assert measures["top_share"] == [{"code": pytest.approx(1.0), "math": pytest.approx(1.0)}]
    assert measures["load_cv"] == [pytest.approx(0.0)] and measures["max_load_ratio"] == [pytest.approx(1.0)]
    # every domain spread over every expert, but expert 0 takes half of all assignments
    blind = hand_trace([[0, 1], [0, 2], [0, 3], [0, 1]] * 4, [0, 1, 0, 1] * 4)
    measures = balance_scope.routing_measures(blind)
    load = np.array([16, 8, 4, 4], dtype=np.float64)  # float64 reference
    assert measures["load_cv"][0] == pytest.approx(load.std() / load.mean(), abs=1e-12)
    assert measures["max_load_ratio"][0] == pytest.approx(load.max() / load.mean(), abs=1e-12)
    code = np.array([8, 4, 0, 4]) / 16  # domain 0 picks 0,1 / 0,3 in turn
    assert measures["top_share"][0]["code"] == pytest.approx(np.sort(code)[-2:].sum())
    assert measures["nmi"][0] == pytest.approx(0.0, abs=1e-12)  # top-1 is expert 0 for everyone


def fake_runs(nmi: dict[str, list[float]], loss: dict[str, list[float]], load: float = 1.2) -> dict:
    return {
        arm: [
            {
                "seed": i,
                "val_loss": {"mean": loss[arm][i]},
                "nmi": [value, value],
                "top_share": [{"code": 0.5, "math": 0.4}] * 2,
                "load_cv": [0.1, 0.2],
                "max_load_ratio": [load, load - 0.1 + 0.01 * i],
            }
            for i, value in enumerate(nmi[arm])
        ]
        for arm in balance_scope.ARMS
    }


def test_verdicts_follow_the_seed_paired_intervals():
    specialised = {"micro_batch": [0.1, 0.11, 0.12], "global": [0.3, 0.32, 0.35]}
    good = fake_runs(specialised, {"micro_batch": [2.0, 2.01, 2.02], "global": [1.99, 2.0, 2.0]})
    outcome = balance_scope.outcome(good, balance_scope.QUICK, 3)
    assert [c.verdict for c in outcome.checks] == [REPRODUCED] * 3 and outcome.verdict == REPRODUCED
    assert outcome.results["nmi_ratio"]["value"] == pytest.approx(np.mean([3.0, 0.32 / 0.11, 0.35 / 0.12]))
    equal_loss = {"micro_batch": [2.0, 2.01, 2.02], "global": [2.0, 2.01, 2.02]}
    same = fake_runs({"micro_batch": [0.3, 0.31, 0.3], "global": [0.3, 0.3, 0.31]}, equal_loss)
    outcome = balance_scope.outcome(same, balance_scope.QUICK, 3)
    assert outcome.checks[0].verdict == NOT_REPRODUCED and outcome.verdict == NOT_REPRODUCED
    unbalanced = fake_runs(specialised, equal_loss, load=3.0)
    assert balance_scope.outcome(unbalanced, balance_scope.QUICK, 3).checks[1].verdict == NOT_REPRODUCED
    noisy = fake_runs(specialised, {"micro_batch": [2.0, 2.5, 2.02], "global": [2.2, 2.0, 2.1]})
    assert balance_scope.outcome(noisy, balance_scope.QUICK, 3).checks[2].verdict == INCONCLUSIVE


def test_the_arms_differ_only_in_the_scope_and_micro_batches_hold_one_domain():
    from moekit.data.lmdata import prepare_data
    from moekit.train.config import RunConfig

    settings = runner.ExperimentSettings(out_dir=Path("unused"))
    configs = {
        arm: balance_scope.run_config(arm, balance_scope.FULL, 0, settings) for arm in balance_scope.ARMS
    }
    scopes = {arm: c["balance"]["objectives"][0]["scope"] for arm, c in configs.items()}
    assert scopes == {"micro_batch": "micro_batch", "global": "global"}
    for config in configs.values():
        config["balance"]["objectives"][0]["scope"] = "?"
        config["name"] = config["out_dir"] = "?"
    assert configs["micro_batch"] == configs["global"]
    config = RunConfig.from_dict(balance_scope.run_config("global", balance_scope.QUICK, 0, settings))
    assert config.data.single_domain_batches and config.data.stream == "sequential"
    assert config.train.grad_accum > 1  # a global batch of several micro-batches
    data = prepare_data(config.data.source, log=lambda _: None)
    stream = data.train_batches(
        config.train.micro_batch_size, config.data.seq_len, seed=0, single_domain=True, stream="sequential"
    )
    seen = set()
    for _ in range(4 * config.train.grad_accum):
        batch = next(stream)
        labels = set(batch.domains[batch.domains >= 0].tolist())
        assert len(labels) == 1
        seen |= labels
    assert len(seen) > 1  # the global batches mix domains


def test_quick_run_end_to_end(tmp_path):
    assert cli.main(["experiment", "balance-scope", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["experiment"] == "balance-scope" and results["quick"] is True
    assert results["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE) and len(results["checks"]) == 3
    runs = results["results"]["runs"]
    layers = balance_scope.QUICK.layers
    for arm in balance_scope.ARMS:
        assert len(runs[arm]) == balance_scope.QUICK.seeds
        for run in runs[arm]:
            assert len(run["nmi"]) == layers and all(0 <= v <= 1 for v in run["nmi"])
            assert np.isfinite(run["val_loss"]["mean"])
            assert set(run["top_share"][0]) == {"code", "english", "math", "multilingual", "structured"}
    # the scope is the only difference between the arms, and it moves the routing
    assert runs["micro_batch"][0]["load_cv"] != runs["global"][0]["load_cv"]
    html = (tmp_path / "report.html").read_text()
    assert "Micro-batch vs global-batch load balancing" in html and "Verdict:" in html


def test_one_seed_is_refused_in_one_line(tmp_path, capsys):
    assert cli.main(["experiment", "balance-scope", "--quick", "--seeds", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--seeds" in err and "\n" not in err
