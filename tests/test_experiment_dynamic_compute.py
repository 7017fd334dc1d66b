"""`moekit experiment dynamic-compute` (#9, #34, #2): experts per token counted against hand-made
traces, the verdict rules on made-up runs, arms that differ only in the router, and the quick path."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit import cli
from moekit.analysis.trace import LayerTrace, RoutingTrace
from moekit.experiments import dynamic_compute, runner
from moekit.experiments.stats import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


def test_experts_per_token_counts_real_experts_only():
    # 4 real experts (ids 0-3) and null experts 4-7; -1 pads the variable-width rows
    experts = torch.tensor([[0, 5, -1, -1], [4, 6, -1, -1], [1, 2, 3, 7], [2, -1, -1, -1]])
    n = len(experts)
    layer = LayerTrace(
        "l0", 8, 4, experts, torch.ones(experts.shape), torch.zeros(experts.shape, dtype=torch.bool),
        torch.zeros(n), torch.zeros(n),
    )  # fmt: skip
    arange = torch.arange(n)
    trace = RoutingTrace(
        arange, arange, arange, torch.zeros(n, dtype=torch.long), arange,
        torch.tensor([0, 0, 1, 1]), [layer, layer], ("easy", "hard"),
    )  # fmt: skip
    counts = dynamic_compute.experts_per_token(trace)
    assert counts["mean_k_per_layer"] == [pytest.approx(5 / 4)] * 2  # 1 + 0 + 3 + 1 real experts
    assert counts["mean_k_by_domain"] == {"easy": pytest.approx(0.5), "hard": pytest.approx(2.0)}
    assert counts["mean_k"] == pytest.approx(1.25)


def fake_runs(mean_k: dict[str, list[float]], loss_scale: dict[str, float], harder_more: bool = True) -> dict:
    domains = ["a", "b", "c", "d", "e"]
    difficulty = dict(zip(domains, [1.0, 1.5, 2.0, 2.5, 3.0], strict=True))
    runs = {}
    for arm, values in mean_k.items():
        runs[arm] = []
        for seed, k in enumerate(values):
            losses = {d: v * loss_scale[arm] + 0.01 * seed for d, v in difficulty.items()}
            order = domains if harder_more else domains[::-1]
            by_domain = {d: k + 0.1 * (i - 2) for i, d in enumerate(order)}
            runs[arm].append(
                {
                    "seed": seed,
                    "val_loss": {**losses, "mean": float(np.mean(list(losses.values())))},
                    "mean_k": k,
                    "mean_k_per_layer": [k, k],
                    "mean_k_by_domain": by_domain,
                }
            )
    return runs


def test_verdicts_follow_the_seed_paired_intervals():
    good = fake_runs(
        {"top2": [2.0] * 3, "top_p": [1.7, 1.75, 1.8], "null_experts": [1.5, 1.6, 1.55]},
        {"top2": 1.0, "top_p": 1.005, "null_experts": 1.0},
    )
    outcome = dynamic_compute.outcome(good, dynamic_compute.QUICK, 3)
    assert [c.verdict for c in outcome.checks] == [REPRODUCED] * 6 and outcome.verdict == REPRODUCED
    assert outcome.results["estimates"]["top_p"]["difficulty_rho"]["value"] == pytest.approx(1.0)
    assert outcome.results["estimates"]["top_p"]["loss_excess"]["value"] == pytest.approx(0.005, abs=1e-3)
    wasteful = fake_runs(
        {"top2": [2.0] * 3, "top_p": [3.0, 3.1, 2.9], "null_experts": [1.5, 1.6, 1.55]},
        {"top2": 1.0, "top_p": 1.1, "null_experts": 1.0},
        harder_more=False,
    )
    outcome = dynamic_compute.outcome(wasteful, dynamic_compute.QUICK, 3)
    verdicts = [c.verdict for c in outcome.checks]
    assert verdicts[:3] == [NOT_REPRODUCED] * 3 and outcome.verdict == NOT_REPRODUCED
    borderline = fake_runs(
        {"top2": [2.0] * 3, "top_p": [1.5, 2.5, 1.9], "null_experts": [1.5, 1.6, 1.55]},
        {"top2": 1.0, "top_p": 1.0, "null_experts": 1.0},
    )
    assert dynamic_compute.outcome(borderline, dynamic_compute.QUICK, 3).checks[0].verdict == INCONCLUSIVE


def moe_routers(config: dict) -> list:
    from moekit.layer import MoE
    from moekit.models.lm import LanguageModel
    from moekit.train.config import RunConfig

    model = LanguageModel(RunConfig.from_dict(config).model_config(vocab_size=259))
    return [module.router for module in model.modules() if isinstance(module, MoE)]


def test_the_arms_differ_only_in_the_router_and_build_the_intended_routers():
    from moekit.routing.null_experts import NullExpertRouter
    from moekit.routing.top_p import TopPRouter

    settings = runner.ExperimentSettings(out_dir=Path("unused"))
    configs = {
        a: dynamic_compute.run_config(a, dynamic_compute.QUICK, 0, settings) for a in dynamic_compute.ARMS
    }
    expected = {"top2": None, "top_p": TopPRouter, "null_experts": NullExpertRouter}
    for arm, config in configs.items():
        routers = moe_routers(config)
        assert len(routers) == dynamic_compute.QUICK.layers
        if expected[arm] is not None:
            assert all(isinstance(r, expected[arm]) for r in routers)
        else:
            assert not any(isinstance(r, TopPRouter | NullExpertRouter) for r in routers)
        kinds = [o["kind"] for o in config["balance"]["objectives"]]
        assert ("entropy" in kinds) == (arm == "top_p")  # #9's dynamic loss goes with top-p only
        config["model"]["moe"] = {"ff_size": config["model"]["moe"]["ff_size"]}
        config["balance"]["objectives"] = config["balance"]["objectives"][:2]
        config["name"] = config["out_dir"] = "?"
    assert configs["top2"] == configs["top_p"] == configs["null_experts"]


def test_quick_run_end_to_end(tmp_path):
    assert (
        cli.main(["experiment", "dynamic-compute", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["experiment"] == "dynamic-compute" and len(results["checks"]) == 6
    assert results["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
    runs = results["results"]["runs"]
    scale = dynamic_compute.QUICK
    for run in runs["top2"]:
        assert run["mean_k"] == pytest.approx(2.0)  # a fixed top-2 router: exactly two everywhere
    # the dynamic routers really vary k per token
    for run in runs["top_p"]:
        assert 1.0 <= run["mean_k"] <= scale.num_experts and run["mean_k"] != pytest.approx(2.0)
    for run in runs["null_experts"]:
        assert 0.0 <= run["mean_k"] <= 4.0 and run["mean_k"] != pytest.approx(2.0)
        assert set(run["mean_k_by_domain"]) == {"code", "english", "math", "multilingual", "structured"}
    html = (tmp_path / "report.html").read_text()
    assert "Experts per token" in html and "Verdict:" in html
