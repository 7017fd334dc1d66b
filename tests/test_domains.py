"""Domain experts: mixing branches into an MoE (BTX, FlexOlmo), opt-out/opt-in, the HDEE ensemble,
recipes, and a tiny end-to-end `moekit build`."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.cli import main as moekit_main
from moekit.domains.ensemble import cumulative_within_documents, hdee_ensemble_nll, hdee_posterior_log_weights
from moekit.domains.experts import add_expert, remove_expert
from moekit.domains.flexolmo import domain_embedding_rows, flexolmo_router_logits, router_bias_vector
from moekit.domains.mix import MixOptions, mean_tensor, mix_lm, router_rows_for
from moekit.domains.recipe import BuildRecipe
from moekit.errors import ConfigError, MoekitError
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.override import RoutingOverride, override_routing

CONFIG = LMConfig(vocab_size=61, hidden_size=16, num_layers=2, num_heads=2, ff_size=24, max_seq_len=32)
IDS = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))


def _branches(n, *, ffn_only=True, seed=0):
    """`n` dense float64 models from one seed whose FFNs (and, unless ffn_only, attention) differ."""
    torch.manual_seed(seed)
    base = LanguageModel(CONFIG).double().eval()
    out = []
    for i in range(n):
        model = LanguageModel(CONFIG).double().eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            g = torch.Generator().manual_seed(100 + i)
            for name, p in model.named_parameters():
                if ".ffn." in name or (not ffn_only and ".attn." in name):
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
        out.append(model)
    return base, out


def _forced(moe, e):
    with torch.no_grad(), override_routing(moe, RoutingOverride(force=[e], top_k=1)):
        return moe(IDS).logits


def test_forced_expert_reproduces_its_branch_when_only_ffns_differ():
    seed, branches = _branches(3)
    moe, provenance = mix_lm(branches, MixOptions(router="random", top_k=2), public=seed)
    assert moe.config.moe.router.num_experts == 4 and moe.config.moe.router.top_k == 2
    for e, source in enumerate([seed, *branches]):
        torch.testing.assert_close(_forced(moe, e), source(IDS).logits, rtol=0, atol=1e-10)
    # shared tensors stay bit-identical (copied, not re-averaged)
    assert torch.equal(moe.blocks[0].attn.q_proj.weight, seed.blocks[0].attn.q_proj.weight)
    assert "mean of" in provenance["embed.weight"]


def test_non_ffn_tensors_are_averaged_and_experts_copied():
    _, branches = _branches(2, ffn_only=False)
    moe, _ = mix_lm(branches, MixOptions())
    want = (branches[0].blocks[1].attn.o_proj.weight + branches[1].blocks[1].attn.o_proj.weight) / 2
    torch.testing.assert_close(moe.blocks[1].attn.o_proj.weight, want, rtol=0, atol=1e-15)
    assert torch.equal(moe.blocks[1].ffn.experts.w_in[1], branches[1].blocks[1].ffn.proj_in.weight)
    assert torch.equal(moe.blocks[1].ffn.experts.w_out[0], branches[0].blocks[1].ffn.proj_out.weight)
    # attention differs from each branch now: forcing an expert no longer reproduces it
    assert (_forced(moe, 0) - branches[0](IDS).logits).abs().max() > 1e-6


def test_mean_tensor_keeps_shared_tensors_bit_identical():
    x = torch.randn(7, 5) * 1e3
    assert torch.equal(mean_tensor([x, x.clone(), x.clone()]), x)
    torch.testing.assert_close(mean_tensor([x, 3 * x]), 2 * x)


def test_mismatched_branches_are_refused_naming_the_field():
    _, branches = _branches(1)
    other = LanguageModel(LMConfig(**{**CONFIG.to_dict(), "ff_size": 32})).double()
    with pytest.raises(MoekitError, match="model.ff_size"):
        mix_lm([branches[0], other], MixOptions(), names=["code", "math"])


def test_flexolmo_formula_is_the_linear_router_with_its_bias():
    x = torch.randn(9, 16, dtype=torch.float64)
    rows = torch.randn(4, 16, dtype=torch.float64)
    bias = torch.tensor([-0.3, 0.7, -2.0], dtype=torch.float64)
    z = flexolmo_router_logits(x, rows, bias)
    torch.testing.assert_close(z[:, 0], x @ rows[0])
    torch.testing.assert_close(z[:, 1], x @ rows[1] - 0.3)
    torch.testing.assert_close(z[:, 2], x @ rows[2])  # a positive b never favours a domain expert
    vector = router_bias_vector(3, -0.5)
    torch.testing.assert_close(
        x @ rows.T + vector, flexolmo_router_logits(x, rows, torch.full((3,), -0.5).double())
    )


def _domain_ids():
    """Two 'domains' over disjoint halves of the vocabulary."""
    g = torch.Generator().manual_seed(0)
    return [[torch.randint(0, 30, (1, 16), generator=g) for _ in range(3)],
            [torch.randint(30, 61, (1, 16), generator=g) for _ in range(3)]]  # fmt: skip


def _top1(moe, ids):
    with torch.no_grad():
        return torch.cat([moe(x).routings[0].logits.argmax(-1) for x in ids])


def test_hidden_and_flexolmo_routers_send_domain_tokens_to_their_expert():
    """hidden: domain d's tokens go to expert d; FlexOlmo (papers.md's small-scale test): > 70% of
    domain d's top-1 choices are its own expert or the public one, and its own beats the other's."""
    seed, branches = _branches(2)
    ids = _domain_ids()
    hidden = MixOptions(router="hidden", top_k=1)
    moe, _ = mix_lm(branches, hidden, router_rows=router_rows_for(hidden, branches, None, ids))
    for d in range(2):
        assert (_top1(moe, ids[d]) == d).float().mean() > 0.5
    flex = MixOptions(router="flexolmo", bias=0.0, top_k=1)
    moe, _ = mix_lm(branches, flex, public=seed, router_rows=router_rows_for(flex, branches, seed, ids))
    for d in range(2):
        top1 = _top1(moe, ids[d])
        own, other = (top1 == d + 1).float().mean(), (top1 == 2 - d).float().mean()
        assert ((top1 == 0) | (top1 == d + 1)).float().mean() > 0.7 and own > other
    random, _ = mix_lm(branches, MixOptions(router="random"))
    assert not torch.equal(random.blocks[0].ffn.router.weight, moe.blocks[0].ffn.router.weight)


def test_flexolmo_negative_bias_moves_tokens_to_the_public_expert():
    seed, branches = _branches(2)
    ids = _domain_ids()
    shares = []
    for bias in (0.0, -1.0, -50.0):
        options = MixOptions(router="flexolmo", bias=bias, top_k=1)
        moe, _ = mix_lm(
            branches, options, public=seed, router_rows=router_rows_for(options, branches, seed, ids)
        )
        assert torch.equal(moe.blocks[0].ffn.router.bias, router_bias_vector(2, bias))
        shares.append((_top1(moe, ids[0] + ids[1]) == 0).float().mean().item())
    assert shares[0] < shares[1] <= shares[2] == 1.0


def test_domain_embedding_rows_are_unit_rows_with_the_public_mean_first():
    means = torch.randn(3, 8, dtype=torch.float64)
    rows = domain_embedding_rows(means)
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(rows[0], torch.nn.functional.normalize(means.mean(0), dim=0))


@pytest.mark.parametrize("expert", [1, 3])
def test_opt_out_removes_one_expert_and_keeps_the_rest_bit_identical(expert):
    seed, branches = _branches(3)
    options = MixOptions(router="flexolmo", bias=-0.2, top_k=2)
    moe, _ = mix_lm(branches, options, public=seed)  # random rows, FlexOlmo bias
    with pytest.raises(ConfigError, match="public expert"):
        remove_expert(moe, 0)  # the bias is defined relative to expert 0
    smaller = remove_expert(moe, expert)
    assert smaller.config.moe.router.num_experts == 3
    keep = [e for e in range(4) if e != expert]
    for name, tensor in smaller.state_dict().items():
        original = moe.state_dict()[name]
        assert torch.equal(tensor, original[keep] if tensor.shape != original.shape else original), name
    with torch.no_grad(), override_routing(moe, RoutingOverride(mask=[expert])):
        masked = moe(IDS).logits
    torch.testing.assert_close(smaller(IDS).logits, masked, rtol=0, atol=1e-12)
    assert (smaller(IDS).logits - moe(IDS).logits).abs().max() > 1e-6  # the expert mattered


def test_opt_in_of_the_removed_expert_restores_the_model_bit_for_bit():
    seed, branches = _branches(2)
    moe, _ = mix_lm(branches, MixOptions(router="flexolmo", bias=-0.4), public=seed)
    last = moe.config.moe.router.num_experts - 1
    back = add_expert(
        remove_expert(moe, last),
        [b.ffn.experts.w_in[last] for b in moe.blocks],
        [b.ffn.experts.w_out[last] for b in moe.blocks],
        [b.ffn.router.weight[last] for b in moe.blocks],
        bias=-0.4,
    )
    assert back.config == moe.config
    for name, tensor in moe.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    with pytest.raises(ConfigError, match="proj_in"):
        add_expert(moe, [], [], [])
    with pytest.raises(ConfigError, match="expert"):
        remove_expert(moe, 7)


def _reference_cumulative(values, doc_ids):
    out = torch.zeros_like(values)
    for b in range(values.shape[-2]):
        running = 0.0
        for t in range(values.shape[-1]):
            if t > 0 and doc_ids[b, t] != doc_ids[b, t - 1]:
                running = 0.0
            out[..., b, t] = running
            running = running + values[..., b, t]
    return out


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(0, 2**16))
def test_cumulative_within_documents_matches_a_loop(n, b, s, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, b, s, generator=g, dtype=torch.float64)
    doc_ids = torch.randint(0, 2, (b, s), generator=g).cumsum(-1)
    torch.testing.assert_close(
        cumulative_within_documents(values, doc_ids), _reference_cumulative(values, doc_ids)
    )


def test_hdee_posterior_follows_the_better_expert_and_bounds_the_ensemble():
    g = torch.Generator().manual_seed(1)
    good = -torch.rand(1, 40, generator=g, dtype=torch.float64) * 0.2
    bad = -1.0 - torch.rand(1, 40, generator=g, dtype=torch.float64)
    logprobs = torch.stack([bad, good])
    doc_ids = torch.zeros(1, 40, dtype=torch.long)
    weights = hdee_posterior_log_weights(logprobs, doc_ids).exp()
    torch.testing.assert_close(weights[:, 0, 0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert weights[1, 0, -1] > 0.99 and (weights[1, 0, 1:] >= weights[1, 0, :-1] - 1e-12).all()
    total = hdee_ensemble_nll(logprobs, doc_ids).sum()
    best = -logprobs.sum(-1).max()  # BTM: the ensemble pays at most log N over the best expert
    assert best - 1e-9 <= total <= best + torch.log(torch.tensor(2.0)) + 1e-9
    uniform = -(logprobs.exp().mean(0)).log().sum()
    assert total < uniform  # the posterior beats uniform averaging on in-domain text
    # a new document restarts the posterior
    doc_ids[:, 20:] = 1
    assert hdee_posterior_log_weights(logprobs, doc_ids).exp()[1, 0, 20] == 0.5


RECIPE = {
    "data": {"source": "sample", "tokenizer": "byte", "seq_len": 32},
    "domains": ["code", "math"],
    "seed": {
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "ff_size": 64, "max_seq_len": 32},
        "steps": 8,
    },
    "train": {"micro_batch_size": 4, "warmup_steps": 2, "lr": 0.01},
    "branch": {"steps": 12, "parts": "ffn"},
    "variants": [
        {"name": "btx", "router": "random"},
        {"name": "flex", "router": "flexolmo", "bias": -0.5},
        {"name": "bam", "router": "random", "attention": "experts"},
    ],
    "post_train": {"steps": 3},
    "eval": {"batches": 2, "batch_size": 2},
    "baselines": {"hdee": True, "merge": [{"method": "pcb", "ratio": 0.2}]},
}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"variants": [{"name": "x", "router": "kmeans"}]}, "variants[0].router"),
        ({"variants": [{"name": "x", "rooter": "random"}]}, "variants[0].rooter"),
        ({"variants": [{"name": "x", "router": "flexolmo", "bias": 1.0}]}, "variants[0].bias"),
        ({"branch": {"parts": "attention"}}, "branch.parts"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"steps": 3}}, "train.steps"),
        ({"baselines": {"merge": [{"method": "slerp"}]}}, "baselines.merge[0].method"),
        ({"baselines": {"merge": [{"method": "ta"}, {"method": "ta"}]}}, "baselines.merge[1].name"),
        ({"colour": "red"}, "colour"),
        ({"seed": {"steps": 3}}, "seed"),
        ({"domains": ["code", "code"]}, "domains"),
        ({"branch": {"parts": "flexolmo", "bias": 0.5}}, "branch.bias"),
        ({"branch": {"parts": "flexolmo"}}, "variants[0].router"),  # owners mix only as FlexOlmo
        (
            {"branch": {"parts": "flexolmo"}, "variants": [{"name": "f", "router": "flexolmo"}]},
            "baselines.merge",
        ),
    ],
)
def test_recipe_errors_name_the_field(change, field):
    with pytest.raises(ConfigError) as info:
        BuildRecipe.from_dict({**RECIPE, **change})
    assert info.value.field == field


def test_merge_parameters_are_checked_before_any_training(tmp_path, capsys):
    from moekit.domains.build import build

    for merge, field in (
        ({"method": "pcb", "ratio": 2}, "ratio"),
        ({"method": "ties", "ratio": 0.1}, "ratio"),
    ):
        recipe = BuildRecipe.from_dict({**RECIPE, "baselines": {"merge": [merge]}})
        with pytest.raises(ConfigError) as info:
            build(recipe, out_dir=tmp_path / "out", log=lambda _: None)
        assert info.value.field == f"baselines.merge[0].{field}"
        assert not (tmp_path / "out").exists()


def test_build_cli_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "domains": ["code", "poetry"]}))
    out = tmp_path / "out"
    assert moekit_main(["build", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "domains" in err and "poetry" in err
    assert not out.exists()


@pytest.mark.production_threads
def test_tiny_build_end_to_end(tmp_path, capsys):
    """branch -> mix -> post-train -> losses, HDEE, opt-out matrix, HF folder; then opt-out/opt-in
    on the command line."""
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "build"
    assert moekit_main(["build", str(recipe), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "report.md").read_text().startswith("# build")
    models = results["models"]
    assert {"seed", "branch-code", "branch-math", "hdee", "btx", "flex", "merge-pcb"} <= set(models)
    assert models["merge-pcb"]["step0"] != models["seed"]["step0"] and "post" in models["merge-pcb"]
    # FFN-only branches: attention and embeddings stay the seed's, so every forced expert is exact
    for variant in ("btx", "flex", "bam"):
        assert all(c["exact_by_construction"] and c["passed"] for c in results["checks"][variant].values())
    assert models["flex"]["experts"] == ["public", "code", "math"]
    assert set(results["opt_out"]["flex"]["delta"]) == {"code", "math"}
    assert models["btx"]["post"]["mean"] < models["btx"]["step0"]["mean"]  # post-mix training trains
    assert "post_router_only" in models["flex"]
    assert results["hf"]["btx"]["written"] and results["hf"]["btx"]["max_abs_logit_diff"] < 1e-4
    assert not results["hf"]["flex"]["written"] and "router_bias" in results["hf"]["flex"]["reason"]
    assert not results["hf"]["bam"]["written"] and "attention experts" in results["hf"]["bam"]["reason"]
    assert {"mix_beats_pcb_merge", "opt_out_diagonal_dominant", "flexolmo_router_without_training"} <= set(
        results["claims"]
    )
    bam = results["claims"]["bam_full_attention_experts_le_btx"]
    assert bam["btx"]["variant"] == "btx" and bam["bam_full"]["variant"] == "bam" and "verdict" in bam
    assert set(results["opt_out"]["bam"]["delta"]) == {"code", "math"}
    # BAM on the command line: KV-shared attention experts in parallel blocks (sequential branches:
    # another function, so the step-0 distance is reported, not held to a tolerance)
    assert moekit_main(["mix", str(out / "branches"), str(tmp_path / "bam-kv"), "--attention", "shared_kv",
                        "--attention-top-k", "1", "--parallel"]) == 0  # fmt: skip
    receipt = json.loads((tmp_path / "bam-kv" / "mix_receipt.json").read_text())
    assert receipt["output"]["model"]["attention_experts"] == {
        "num_experts": 2,
        "top_k": 1,
        "shared_kv": True,
    }
    assert not any(c["exact_by_construction"] for c in receipt["checks"].values())
    assert (
        moekit_main(["mix", str(tmp_path / "bam-kv"), str(tmp_path / "bam-kv-no-math"), "--remove", "math"])
        == 0
    )
    assert moekit_main(["mix", str(tmp_path / "bam-kv-no-math"), str(tmp_path / "bam-kv-back"), "--add",
                        str(out / "branches" / "math"), "--domain", "math"]) == 0  # fmt: skip
    back = json.loads(next((tmp_path / "bam-kv-back" / "checkpoints").glob("step-*/state.json")).read_text())
    assert back["expert_domains"] == ["code", "math"]
    assert back["config"]["model"]["attention_experts"]["num_experts"] == 2
    mixed = out / "mix" / "flex"
    assert moekit_main(["mix", str(mixed), str(tmp_path / "no-code"), "--remove", "code"]) == 0
    assert moekit_main(["mix", str(tmp_path / "no-code"), str(tmp_path / "back"), "--add",
                        str(out / "branches" / "code"), "--domain", "code"]) == 0  # fmt: skip
    state = json.loads(next((tmp_path / "back" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["expert_domains"] == ["public", "math", "code"]
    capsys.readouterr()
    assert moekit_main(["mix", str(mixed), str(tmp_path / "x"), "--remove", "poetry"]) == 2
    assert "remove" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.production_threads
@pytest.mark.parametrize(
    "family, moe_family", [("llama", "mixtral"), ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")]
)
def test_hf_dense_seed_branches_mixes_and_exports_to_its_moe_family(tmp_path, family, moe_family):
    """HF in (a Llama / Qwen2 / Qwen3 seed through model.init_from), HF out (the mix as Mixtral /
    Qwen2-MoE / Qwen3-MoE, loaded back)."""
    from transformers import AutoModelForCausalLM

    from moekit.domains.branch import branch
    from moekit.domains.mix import mix
    from moekit.interop.lm_hf import lm_to_hf
    from moekit.interop.tiny import tiny_dense_model

    seed = tmp_path / family
    tiny_dense_model(family, vocab_size=259).save_pretrained(seed)
    train = {"micro_batch_size": 2, "warmup_steps": 1}
    manifest = branch(seed, tmp_path / "branches", ["code", "math"], seq_len=32, steps=3, parts="ffn",
                      train=train, eval_batches=1, log=lambda _: None)  # fmt: skip
    assert set(manifest["runs"]) == {"code", "math"}
    receipt = mix(tmp_path / "branches", tmp_path / "mixed", MixOptions(router="hidden"), log=lambda _: None)
    assert all(c["exact_by_construction"] and c["passed"] for c in receipt["checks"].values())
    from moekit.construct.lm import load_run_model

    moe = load_run_model(tmp_path / "mixed")[0]
    lm_to_hf(moe, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf.config.model_type == moe_family and moe.config.moe.router.num_experts == 2
    ids = IDS % 259
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, moe(ids).logits, rtol=0, atol=1e-4)


def test_branch_and_mix_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    from moekit.train.checkpoint import save_checkpoint

    moe_seed = tmp_path / "moe-seed"
    seed, branches = _branches(2)
    moe, _ = mix_lm(branches, MixOptions())
    save_checkpoint(
        moe_seed / "checkpoints" / "step-000000", moe, None, {"config": {"model": moe.config.to_dict()}}
    )
    dense_seed = tmp_path / "dense-seed"
    save_checkpoint(
        dense_seed / "checkpoints" / "step-000000", seed, None, {"config": {"model": CONFIG.to_dict()}}
    )
    existing = tmp_path / "already-here"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [
        (["branch", str(tmp_path / "nowhere"), str(tmp_path / "o1"), "--domains", "code"], "no such folder"),
        (["branch", str(dense_seed), str(tmp_path / "o2"), "--domains", "code,poetry"], "poetry"),
        (["branch", str(moe_seed), str(tmp_path / "o3"), "--domains", "code"], "is an MoE"),
        (["mix", str(dense_seed), str(tmp_path / "o4")], "branches"),
        (["mix", str(moe_seed), str(tmp_path / "o5"), "--remove", "code"], "not a mixed model"),
        (["branch", str(dense_seed), str(tmp_path / "o6"), "--domains", "code", "--steps", "x"], "--steps"),
        (["branch", str(dense_seed), str(existing), "--domains", "code"], "exists"),
    ]
    for argv, needle in cases:
        try:
            status = moekit_main(argv)
        except SystemExit as exc:  # argparse's usage errors
            status = exc.code
        assert status == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, (argv, err)
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4", "o5", "o6"))
    assert [p.name for p in existing.iterdir()] == ["keep.txt"] and (
        existing / "keep.txt"
    ).read_text() == "mine"


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "configs" / "domains").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = BuildRecipe.load(path)
        assert recipe.variants and len(recipe.domains) >= 2


@given(st.lists(st.floats(-5.0, 5.0), min_size=2, max_size=6), st.integers(0, 10_000))
def test_flexolmo_learnable_bias_never_raises_a_logit(values, seed):
    from moekit.domains.flexolmo import public_free_negative_bias

    b = torch.tensor(values, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    rows = torch.randn(len(values), 8, dtype=torch.float64)
    z, biased = x @ rows.T, x @ rows.T + public_free_negative_bias(b)
    assert torch.equal(biased[:, 0], z[:, 0]) and bool((biased <= z).all())


def test_flexolmo_bias_trains_while_negative_in_the_mixed_router():
    """The mixed model's router applies min(b, 0): b_j < 0 gets a gradient, b_j > 0 and the public
    expert's entry get none, and a positive stored b leaves the logits unbiased."""
    seed, branches = _branches(2)
    ids = _domain_ids()
    options = MixOptions(router="flexolmo", bias=-0.5, top_k=1)
    moe, _ = mix_lm(branches, options, public=seed, router_rows=router_rows_for(options, branches, seed, ids))
    assert moe.config.moe.router.negative_bias
    router = moe.blocks[0].ffn.router
    with torch.no_grad():
        router.bias.copy_(torch.tensor([0.0, -0.5, 3.0], dtype=torch.float64))
    x = torch.randn(7, CONFIG.hidden_size, dtype=torch.float64)
    logits = router.logits(x)
    logits.logsumexp(-1).sum().backward()
    grad = router.bias.grad
    assert grad[0] == 0 and grad[1] != 0 and grad[2] == 0
    unbiased = x @ router.weight.detach().T
    torch.testing.assert_close(logits[:, 2].detach(), unbiased[:, 2], rtol=0, atol=1e-12)
    torch.testing.assert_close(logits[:, 1].detach(), unbiased[:, 1] - 0.5, rtol=0, atol=1e-12)


def _owners(count, *, steps=3, top_k=2):
    """FlexOlmo owners trained a few AdamW steps (weight decay on) on their own domain's ids."""
    from moekit.domains.coordinated import freeze_for_owner_training, owner_model

    public, _ = _branches(0)
    ids = _domain_ids() + [[torch.randint(0, 61, (1, 16), generator=torch.Generator().manual_seed(9))]]
    rows = router_rows_for(MixOptions(router="flexolmo"), [], public, ids[:count])
    owners = []
    for j in range(count):
        owner = owner_model(public, [r[[0, 1 + j]] for r in rows], top_k=top_k, bias=-0.3).train()
        optimizer = torch.optim.AdamW(owner.parameters(), lr=1e-2, weight_decay=0.1)
        freeze_for_owner_training(owner, optimizer)
        for _ in range(steps):
            for x in ids[j]:
                out = owner(x)
                torch.nn.functional.cross_entropy(out.logits[0, :-1], x[0, 1:]).backward()
                optimizer.step()
                optimizer.zero_grad()
        owners.append(owner.eval())
    return public, owners


def test_flexolmo_owner_training_moves_only_the_owners_expert_row_and_bias():
    public, (owner,) = _owners(1)
    before = _owners(1, steps=0)[1][0].state_dict()
    after = owner.state_dict()
    for name, tensor in after.items():
        if ".ffn." not in name:
            assert torch.equal(tensor, public.state_dict()[name]), name
        else:
            assert torch.equal(tensor[0], before[name][0]), name  # the public expert / row
    ffn = owner.blocks[0].ffn
    assert not torch.equal(ffn.experts.w_in[1], before["blocks.0.ffn.experts.w_in"][1])
    assert not torch.equal(ffn.router.weight[1], before["blocks.0.ffn.router.weight"][1])
    assert ffn.router.bias[1] != before["blocks.0.ffn.router.bias"][1]  # b learns (it is < 0)
    assert torch.equal(ffn.experts.w_in[0], public.blocks[0].ffn.proj_in.weight)


@pytest.mark.parametrize("top_k", [1, 2])
def test_flexolmo_merge_with_others_opted_out_is_each_owners_model(top_k):
    """The property that makes FlexOlmo work without joint training (float64)."""
    from moekit.domains.coordinated import merge_owners

    _, owners = _owners(3, steps=2, top_k=top_k)
    merged, _ = merge_owners(owners, ["a", "b", "c"], top_k=2)
    assert merged.config.moe.router.num_experts == 4 and merged.config.moe.router.negative_bias
    assert torch.equal(merged.blocks[1].ffn.experts.w_out[0], owners[2].blocks[1].ffn.experts.w_out[0])
    for j, owner in enumerate(owners):
        alone = merged
        for other in sorted((1 + o for o in range(3) if o != j), reverse=True):
            alone = remove_expert(alone, other)
        with torch.no_grad():
            want = owner(IDS).logits
            got = _with_top_k(alone, top_k)(IDS).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert (merged(IDS).logits - want).abs().max() > 1e-6  # the other owners matter when in


def _with_top_k(model, k):
    from moekit.domains.experts import _with_experts

    out = LanguageModel(_with_experts(model.config, model.config.moe.router.num_experts, top_k=k)).double()
    out.load_state_dict(model.state_dict())
    return out.eval()


def test_flexolmo_merge_refuses_uncoordinated_owners():
    from moekit.domains.coordinated import merge_owners

    _, owners = _owners(2, steps=0)
    with torch.no_grad():
        owners[1].blocks[0].attn.q_proj.weight.add_(1e-3)
    with pytest.raises(MoekitError, match="attn.q_proj.weight differs"):
        merge_owners(owners, ["a", "b"], top_k=2)
    _, owners = _owners(2, steps=0)
    with torch.no_grad():
        owners[1].blocks[0].ffn.router.weight[0].add_(1e-3)
    with pytest.raises(MoekitError, match="public expert"):
        merge_owners(owners, ["a", "b"], top_k=2)


@pytest.mark.parametrize("family", ["qwen2"])  # the HF seed loads as for every dense family
def test_flexolmo_branch_and_merge_from_an_hf_seed(tmp_path, family):
    """`branch --parts flexolmo` then `mix --router flexolmo`: owners keep the seed's non-FFN
    tensors and public expert bit for bit; the merge passes the owner-alone step-0 checks."""
    from moekit.construct.lm import load_run_model
    from moekit.domains.branch import branch
    from moekit.domains.mix import load_lm, mix
    from moekit.interop.tiny import tiny_dense_model

    seed = tmp_path / family
    tiny_dense_model(family, vocab_size=259).save_pretrained(seed)
    train = {"micro_batch_size": 2, "warmup_steps": 1, "weight_decay": 0.1}
    branch(seed, tmp_path / "branches", ["code", "math"], seq_len=32, steps=3, parts="flexolmo", top_k=2,
           bias=-0.4, train=train, eval_batches=1, log=lambda _: None)  # fmt: skip
    public = load_lm(seed).state_dict()
    for domain in ("code", "math"):
        owner = load_run_model(tmp_path / "branches" / domain)[0]
        init = load_run_model(tmp_path / "branches" / "init" / domain)[0].state_dict()
        for name, tensor in owner.state_dict().items():
            if ".ffn." not in name:
                assert torch.equal(tensor, public[name]), name
            else:
                assert torch.equal(tensor[0], init[name][0]), name
        assert not torch.equal(owner.blocks[0].ffn.experts.w_in[1], init["blocks.0.ffn.experts.w_in"][1])
    with pytest.raises(ConfigError, match="mix.router"):
        mix(tmp_path / "branches", tmp_path / "bad", MixOptions(router="hidden"), log=lambda _: None)
    receipt = mix(
        tmp_path / "branches", tmp_path / "mixed", MixOptions(router="flexolmo"), log=lambda _: None
    )
    assert receipt["expert_domains"] == ["public", "code", "math"] and receipt["coordinated"]
    assert all(c["exact_by_construction"] and c["passed"] for c in receipt["checks"].values())
    assert not (tmp_path / "bad").exists()
