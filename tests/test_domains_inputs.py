"""Bad input to `moekit branch`, `mix` and `build`: one line naming the option or field, exit
status 2, refused before any corpus is built or model trained, and nothing left on disk."""

import json

import pytest
import torch
import yaml

from moekit.cli import main as moekit_main
from moekit.domains.mix import MixOptions, mix_lm
from moekit.domains.recipe import BuildRecipe
from moekit.errors import ConfigError, MoekitError
from moekit.models.lm import LanguageModel, LMConfig
from moekit.train.checkpoint import save_checkpoint
from test_domains import RECIPE as FULL_RECIPE

# a byte-tokenizer dense model of 32 positions
DENSE = LMConfig(vocab_size=259, hidden_size=16, num_layers=1, num_heads=2, ff_size=24, max_seq_len=32)
# test_domains.py's small recipe, one variant and no baselines: checks that train nothing
RECIPE = {
    **{k: v for k, v in FULL_RECIPE.items() if k != "baselines"},
    "variants": [{"name": "btx", "router": "random"}],
    "hf": False,
}


def _save_dense(folder, seed=0):
    torch.manual_seed(seed)
    model = LanguageModel(DENSE).eval()
    state = {"config": {"model": DENSE.to_dict(), "data": {"source": "sample", "tokenizer": "byte"}}}
    save_checkpoint(folder / "checkpoints" / "step-000000", model, None, state)
    return folder


def _branches_folder(root, manifest_changes=None):
    """A branches folder as `moekit branch` writes it (two dense runs), without training."""
    root.mkdir()
    _save_dense(root / "seed")
    for i, domain in enumerate(("code", "math")):
        _save_dense(root / domain, seed=i + 1)
    manifest = {
        "format": "moekit-branches",
        "version": 1,
        "seed": str(root / "seed"),
        "source": "sample",
        "tokenizer": "byte",
        "seq_len": 32,
        "parts": "ffn",
        "steps": 1,
        "domains": ["code", "math"],
        "runs": {"code": "code", "math": "math"},
        "val_loss": {},
        **(manifest_changes or {}),
    }
    manifest = {k: v for k, v in manifest.items() if v is not None}
    (root / "branches.json").write_text(json.dumps(manifest))
    return root


def _run(argv, capsys):
    """Exit status and the one stderr line of a refused command."""
    try:
        status = moekit_main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, (argv, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if anything trains or builds a corpus."""
    import moekit.data.build
    import moekit.domains.branch

    def refuse(*args, **kwargs):
        raise AssertionError("long work started before the input was checked")

    monkeypatch.setattr(moekit.domains.branch, "train_run", refuse)
    monkeypatch.setattr(moekit.data.build, "build_corpus", refuse)


# -- 1, 7: a top-k above the expert count is refused, naming the option or field -----------------


def test_build_variant_top_k_above_the_experts_is_refused_naming_the_field(tmp_path, capsys, no_training):
    recipe = {**RECIPE, "variants": [{"name": "btx", "router": "random", "top_k": 9}]}
    with pytest.raises(ConfigError) as info:
        BuildRecipe.from_dict(recipe)
    assert info.value.field == "variants[0].top_k" and "at most 2" in str(info.value)
    flex = {**RECIPE, "variants": [{"name": "f", "router": "flexolmo", "top_k": 3}]}  # public + 2
    assert BuildRecipe.from_dict(flex).variants[0].options.top_k == 3
    with pytest.raises(ConfigError, match="variants.0..attention_top_k"):
        BuildRecipe.from_dict(
            {**RECIPE, "variants": [{"name": "b", "attention": "experts", "attention_top_k": 3}]}
        )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    err = _run(["build", path, "--out", tmp_path / "out"], capsys)
    assert "variants[0].top_k: got 9, expected at most 2" in err
    assert not (tmp_path / "out").exists()


def test_mix_top_k_above_the_experts_is_refused_naming_the_option(tmp_path, capsys):
    branches = _branches_folder(tmp_path / "branches")
    cases = [
        (["--top-k", "9"], "--top-k: got 9, expected at most 2"),
        (["--router", "flexolmo", "--top-k", "4"], "--top-k: got 4, expected at most 3"),
        (["--attention", "experts", "--attention-top-k", "9"], "--attention-top-k: got 9, expected 0"),
        (["--attention-top-k", "1"], "--attention-top-k"),  # only with attention experts
        (["--bias", "-1"], "--bias: only --router flexolmo"),
    ]
    for extra, needle in cases:
        err = _run(["mix", branches, tmp_path / "out", *extra], capsys)
        assert needle in err, err
        assert not (tmp_path / "out").exists()


def test_mix_lm_refuses_a_top_k_above_its_experts():
    model = LanguageModel(DENSE).eval()
    with pytest.raises(ConfigError, match="mix.top_k: got 3, expected at most 2"):
        mix_lm([model, model], MixOptions(top_k=3))
    with pytest.raises(ConfigError, match="mix.attention_top_k"):
        mix_lm([model, model], MixOptions(attention="experts", attention_top_k=5))


def test_branch_flexolmo_top_k_above_the_owners_two_experts_is_refused(tmp_path, capsys, no_training):
    seed = _save_dense(tmp_path / "seed")
    out = tmp_path / "out"
    argv = ["branch", seed, out, "--domains", "code", "--seq-len", "32", "--parts", "flexolmo"]
    assert "--top-k: got 9, expected 1 or 2" in _run([*argv, "--top-k", "9"], capsys)
    # --top-k and --bias set the owner models of --parts flexolmo only
    plain = ["branch", seed, out, "--domains", "code", "--seq-len", "32"]
    assert "--top-k: only --parts flexolmo" in _run([*plain, "--top-k", "1"], capsys)
    assert not out.exists()
    with pytest.raises(ConfigError) as info:
        BuildRecipe.from_dict({**RECIPE, "branch": {"parts": "flexolmo", "top_k": 3},
                               "variants": [{"name": "f", "router": "flexolmo"}]})  # fmt: skip
    assert info.value.field == "branch.top_k"
    with pytest.raises(ConfigError) as info:
        BuildRecipe.from_dict({**RECIPE, "branch": {"parts": "ffn", "top_k": 1}})
    assert info.value.field == "branch.top_k"
    with pytest.raises(ConfigError) as info:
        BuildRecipe.from_dict({**RECIPE, "variants": [{"name": "b", "router": "random", "bias": -1.0}]})
    assert info.value.field == "variants[0].bias"


# -- 2: a seq_len above the seed's positions --------------------------------------------------------


def test_build_seq_len_above_the_seed_model_is_refused_naming_both_fields(tmp_path, capsys, no_training):
    recipe = {**RECIPE, "data": {**RECIPE["data"], "seq_len": 64}}
    with pytest.raises(ConfigError) as info:
        BuildRecipe.from_dict(recipe)
    assert info.value.field == "data.seq_len" and "seed.model.max_seq_len=32" in str(info.value)
    # a seed.path: its checkpoint's max_seq_len, checked before anything is built
    from moekit.domains.build import build

    seed = _save_dense(tmp_path / "seed")
    recipe = BuildRecipe.from_dict({**recipe, "seed": {"path": str(seed)}})
    with pytest.raises(ConfigError) as info:
        build(recipe, out_dir=tmp_path / "out", log=lambda _: None)
    assert info.value.field == "data.seq_len" and "max_seq_len=32" in str(info.value)
    assert not (tmp_path / "out").exists()


# -- 3: unknown domains refused before the corpus is built ----------------------------------------


def test_build_unknown_domain_is_refused_before_building_the_corpus(tmp_path, monkeypatch, no_training):
    from moekit.domains.build import build

    monkeypatch.setenv("MOEKIT_DATA_CACHE", str(tmp_path / "empty-cache"))  # builtin not built
    recipe = {**RECIPE, "data": {**RECIPE["data"], "source": "builtin"}, "domains": ["code", "poetry"]}
    with pytest.raises(ConfigError) as info:
        build(BuildRecipe.from_dict(recipe), out_dir=tmp_path / "out", log=lambda _: None)
    assert info.value.field == "domains" and "poetry" in str(info.value)
    recipe = {**RECIPE, "data": {**RECIPE["data"], "source": str(tmp_path / "nowhere")}}
    with pytest.raises(ConfigError) as info:  # 9: the recipe's field, not an internal `source`
        build(BuildRecipe.from_dict(recipe), out_dir=tmp_path / "out", log=lambda _: None)
    assert info.value.field == "data.source"
    assert not (tmp_path / "out").exists() and not (tmp_path / "empty-cache").exists()


# -- 5: a branches.json without its fields ---------------------------------------------------------


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"runs": None}, "missing field 'runs'"),
        ({"domains": None}, "missing field 'domains'"),
        ({"runs": {"code": "code"}}, "no run folder for domain 'math'"),
        ({"runs": {"code": "code", "math": "elsewhere"}}, "runs.math is 'elsewhere', no such folder"),
        ({"domains": "code"}, "field 'domains'"),
        ({"seq_len": "long"}, "field 'seq_len'"),
    ],
)
def test_mix_refuses_a_branches_json_without_its_fields(tmp_path, capsys, changes, needle):
    branches = _branches_folder(tmp_path / "branches", changes)
    err = _run(["mix", branches, tmp_path / "out"], capsys)
    assert "branches.json" in err and needle in err, err
    assert not (tmp_path / "out").exists()


def test_mix_names_every_missing_field_of_a_bare_manifest(tmp_path, capsys):
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "branches.json").write_text('{"format": "moekit-branches"}')
    err = _run(["mix", folder, tmp_path / "out"], capsys)
    assert f"{folder / 'branches.json'}: missing fields 'domains', 'runs'" in err


# -- 6: a refused branch leaves nothing behind, so the corrected retry runs -------------------------


@pytest.mark.parametrize("parts", ["all", "flexolmo"])
def test_branch_refused_on_seq_len_writes_nothing(tmp_path, capsys, no_training, parts):
    seed = _save_dense(tmp_path / "seed")
    out = tmp_path / "out"
    err = _run(["branch", seed, out, "--domains", "code,math", "--parts", parts], capsys)  # --seq-len 64
    assert "--seq-len: got 64, above the seed's model.max_seq_len=32" in err
    assert not out.exists()
    out.mkdir()  # an empty folder stays usable (and empty)
    _run(["branch", seed, out, "--domains", "code,math", "--parts", parts], capsys)
    assert list(out.iterdir()) == []


def test_branch_refused_after_writing_owner_inits_removes_them(tmp_path, monkeypatch):
    """A refusal at the first branch's trainer (after FlexOlmo's owner checkpoints were written)
    leaves OUT as it was: absent, or empty."""
    import moekit.domains.branch as branch_module

    def refuse(*args, **kwargs):
        raise MoekitError("refused by the trainer")

    monkeypatch.setattr(branch_module, "train_run", refuse)
    seed = _save_dense(tmp_path / "seed")
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with pytest.raises(MoekitError, match="refused by the trainer"):
            branch_module.branch(seed, out, ["code", "math"], seq_len=32, steps=1, parts="flexolmo",
                                 log=lambda _: None)  # fmt: skip
        assert (list(out.iterdir()) == []) if out.name == "empty" else not out.exists()


def test_branch_seed_vocabulary_smaller_than_the_tokenizer_is_one_line(tmp_path, capsys, no_training):
    small = LMConfig(vocab_size=61, hidden_size=16, num_layers=1, num_heads=2, ff_size=24, max_seq_len=32)
    save_checkpoint(tmp_path / "seed" / "checkpoints" / "step-000000", LanguageModel(small), None,
                    {"config": {"model": small.to_dict()}})  # fmt: skip
    argv = ["branch", tmp_path / "seed", tmp_path / "out", "--domains", "code", "--seq-len", "32"]
    assert "vocabulary of 61 tokens" in _run([*argv, "--parts", "flexolmo"], capsys)
    assert not (tmp_path / "out").exists()


# -- 9: errors name the option the user typed ------------------------------------------------------


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--steps", "0"], "--steps: got 0, expected an integer >= 1"),
        (["--seq-len", "1"], "--seq-len: got 1"),
        (["--source", "nowhere"], "--source: got 'nowhere'"),
        (["--domains", "code,poetry"], "--domains: got 'poetry'"),
        (["--lr", "-1"], "--lr: got -1.0"),
        (["--micro-batch-size", "0"], "--micro-batch-size: got 0"),
        (["--parts", "flexolmo", "--bias", "1"], "--bias: got 1.0"),
    ],
)
def test_branch_errors_name_the_option(tmp_path, capsys, no_training, extra, needle):
    seed = _save_dense(tmp_path / "seed")
    argv = ["branch", seed, tmp_path / "out", "--domains", "code", "--seq-len", "32"]
    err = _run([*argv, *extra], capsys)
    assert needle in err, err
    assert "train." not in err and "data." not in err and "model.init_from" not in err
    assert not (tmp_path / "out").exists()
