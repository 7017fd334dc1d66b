"""`moekit eval-tasks`: exact-answer math tasks, every method end to end on a saved run, the
Wilson interval, and the inputs it refuses."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.cli import main
from moekit.data.mathgen import generate_problem
from moekit.inference.methods.tasks import TASK_SETS, task_problems, wilson_interval
from moekit.layer import MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.spec import preset
from moekit.train.checkpoint import save_checkpoint


def save_run(root):
    torch.manual_seed(0)
    moe = MoEConfig(hidden_size=32, ff_size=16, router=preset("qwen3_moe", 8, 2))
    config = LMConfig(
        vocab_size=259, hidden_size=32, num_layers=3, num_heads=4, ff_size=48, max_seq_len=128, moe=moe
    )
    model = LanguageModel(config)
    state = {
        "config": {"model": config.to_dict(), "data": {"source": "sample", "tokenizer": "byte"}},
        "step": 0,
    }
    save_checkpoint(root / "checkpoints" / "step-0", model, None, state)
    return root


@given(st.integers(0, 200), st.integers(1, 200))
@settings(max_examples=60, deadline=None)
def test_wilson_interval_contains_the_estimate_and_stays_in_bounds(successes, trials):
    successes = min(successes, trials)
    low, high = wilson_interval(successes, trials)
    assert 0.0 <= low <= successes / trials <= high <= 1.0
    wider_low, wider_high = wilson_interval(successes, trials, z=3.0)
    assert wider_low <= low + 1e-12 and wider_high >= high - 1e-12


def test_wilson_interval_matches_a_known_value():
    # 8 of 10, 95%: Wilson interval (0.490, 0.943) (Brown, Cai & DasGupta 2001)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)


def test_task_problems_filter_kinds_and_follow_the_seed_stream():
    problems = task_problems("arithmetic", 12)
    assert len(problems) == 12 and all(p.kind in TASK_SETS["arithmetic"] for p in problems)
    assert task_problems("arithmetic", 5) == problems[:5]
    assert task_problems("all", 3, seed=4) == [generate_problem(4, i) for i in range(3)]


@pytest.mark.parametrize("method", ["none", "scmoe", "rewire", "steer", "odp", "des"])
def test_eval_tasks_runs_each_method_and_reports_cost(tmp_path, capsys, method):
    run = save_run(tmp_path / "run")
    out = tmp_path / "result.json"
    args = [str(run), "--method", method, "--limit", "2", "--max-new-tokens", "3", "--json", str(out)]
    assert main(["eval-tasks", *args, "--rewire-steps", "2", "--samples", "2", "--k-values", "1,3"]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == method and result["problems"] == 2 and len(result["items"]) == 2
    assert result["correct"] == sum(item["correct"] for item in result["items"])
    low, high = result["ci95"]
    assert 0.0 <= low <= result["accuracy"] <= high <= 1.0
    passes = result["cost"]["forward_passes"]
    expected_at_least = {
        "none": 2,
        "odp": 2,
        "steer": 2 + 16,
        "scmoe": 2 * 2 * 3,
        "rewire": 2 * 3 + 2,
        "des": 2 * 2,
    }
    assert passes >= expected_at_least[method]
    assert (result["cost"]["backward_passes"] > 0) == (method == "rewire")
    assert result["cost"]["assignments"] > 0
    assert method in capsys.readouterr().out


def test_odp_spends_fewer_assignments_than_plain_decoding(tmp_path):
    run = save_run(tmp_path / "run")
    costs = {}
    for method in ("none", "odp"):
        out = tmp_path / f"{method}.json"
        args = ["--limit", "2", "--max-new-tokens", "3", "--odp-threshold", "1.0", "--json", str(out)]
        assert main(["eval-tasks", str(run), "--method", method, *args]) == 0
        costs[method] = json.loads(out.read_text())["cost"]["assignments"]
    assert costs["odp"] < costs["none"]


def test_odp_token_importance_saves_assignments_on_top_of_the_weight_rule(tmp_path):
    run = save_run(tmp_path / "run")
    costs = {}
    for name, extra in {
        "ratio": [],
        "importance": ["--odp-skip-fraction", "0.3", "--odp-protect-fraction", "0.1"],
    }.items():
        out = tmp_path / f"{name}.json"
        args = [
            "--limit",
            "2",
            "--max-new-tokens",
            "3",
            "--odp-threshold",
            "0.25",
            *extra,
            "--json",
            str(out),
        ]
        assert main(["eval-tasks", str(run), "--method", "odp", *args]) == 0
        costs[name] = json.loads(out.read_text())["cost"]["assignments"]
    assert costs["importance"] < costs["ratio"]


def test_an_unknown_odp_importance_is_one_line_and_status_2(tmp_path, capsys):
    run = save_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        main(["eval-tasks", str(run), "--method", "odp", "--odp-importance", "entropy"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--odp-importance" in err[0]


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--limit", "0"], "--limit"),
        (["--max-new-tokens", "500"], "--max-new-tokens"),
        (["--alpha", "3", "--method", "scmoe"], "--alpha"),
        (["--json", "/nonexistent-folder/x.json"], "--json"),
        (["--weak-rank", "9", "--method", "scmoe"], "--weak-rank"),
        (["--k-values", "1,x", "--method", "des"], "--k-values"),
        (["--k-values", "0", "--method", "des"], "--k-values"),
        (["--samples", "0", "--method", "des"], "--samples"),
        (["--temperature", "0", "--method", "des"], "--temperature"),
        (["--odp-threshold", "1.5", "--method", "odp"], "--odp-threshold"),
        (["--odp-skip-fraction", "2", "--method", "odp"], "--odp-skip-fraction"),
        (["--odp-protect-fraction", "-0.1", "--method", "odp"], "--odp-protect-fraction"),
        (["--odp-skipped-top-k", "-1", "--method", "odp"], "--odp-skipped-top-k"),
        # past the model's experts: would be clamped, the option silently asking for less
        (
            ["--odp-skipped-top-k", "99", "--odp-threshold", "0.5", "--method", "odp"],
            "--odp-skipped-top-k: got 99",
        ),
        (["--weak-top-k", "99", "--method", "scmoe"], "--weak-top-k: got 99"),
        (["--rewire-steps", "-1", "--method", "rewire"], "--rewire-steps: got -1"),
        (["--rewire-lr", "0", "--method", "rewire"], "--rewire-lr: got 0"),
    ],
)
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, extra, field):
    run = save_run(tmp_path / "run")
    assert main(["eval-tasks", str(run), "--limit", "1", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moekit: error: ") and field in err[0]


def test_des_items_name_the_k_that_solved_them_and_cost_scales_with_samples(tmp_path):
    run = save_run(tmp_path / "run")
    results = {}
    for samples in (1, 3):
        out = tmp_path / f"des{samples}.json"
        args = ["--method", "des", "--samples", str(samples), "--k-values", "1,2,3", "--limit", "2"]
        assert main(["eval-tasks", str(run), *args, "--max-new-tokens", "3", "--json", str(out)]) == 0
        results[samples] = json.loads(out.read_text())
    for result in results.values():
        for item in result["items"]:
            assert item["k"] in (1, 2, 3) and set(item["solved_by_k"]) <= {1, 2, 3}
            assert bool(item["solved_by_k"]) == item["correct"]
    # every trajectory's forward passes are counted: 3 samples cost 3 times 1 (no EOS stops here)
    assert results[3]["cost"]["forward_passes"] == 3 * results[1]["cost"]["forward_passes"]


def test_prompts_start_with_bos_as_training_documents_do():
    """moekit's trainer starts every document with BOS (`encode_segments`): a task prompt without
    it is off the training distribution at position 0, so the tasks put it there."""
    from moekit.data.tokenizer import ByteTokenizer, encode_prompt
    from moekit.inference.methods.tasks import evaluate_method

    tokenizer = ByteTokenizer()
    problem = task_problems("arithmetic", 1)[0]
    ids = encode_prompt(tokenizer, problem.prompt)
    assert ids == [tokenizer.bos_id, *tokenizer.encode(problem.prompt)]
    assert encode_prompt(tokenizer, "") == [tokenizer.bos_id]

    class NoBos:
        def encode(self, text):
            return list(text.encode())

    assert encode_prompt(NoBos(), "ab") == [97, 98]

    torch.manual_seed(0)
    moe = MoEConfig(hidden_size=32, ff_size=16, router=preset("qwen3_moe", 8, 2))
    config = LMConfig(
        vocab_size=259, hidden_size=32, num_layers=2, num_heads=4, ff_size=48, max_seq_len=128, moe=moe
    )
    model = LanguageModel(config)
    first_tokens = []
    model.register_forward_pre_hook(lambda module, args: first_tokens.append(int(args[0][0, 0])))
    for method in ("none", "steer"):
        first_tokens.clear()
        evaluate_method(model, tokenizer, task_problems("arithmetic", 2), method, max_new_tokens=2)
        prefills = [token for token in first_tokens if token == tokenizer.bos_id]
        assert len(prefills) >= 2, method  # every prompt (and reference) starts with BOS
