"""`moekit merge` / merge_checkpoints on HF folders (dense and MoE families) and moekit runs."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli import main as moekit_main
from moekit.errors import MoekitError
from moekit.merging import merge_state_dicts
from moekit.merging.checkpoints import merge_checkpoints

pytest.importorskip("transformers", reason="installed by the `hf` extra that `make test` installs")


def _perturbed(model, seed: int, scale: float = 0.05):
    """A 'fine-tuned' copy: every floating tensor moved by a small seeded perturbation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _hf_folders(tmp_path, family: str, n: int = 2, dense: bool = True):
    from moekit.interop.tiny import tiny_dense_model, tiny_model

    build = tiny_dense_model if dense else tiny_model
    base = tmp_path / "base"
    build(family, seed=0).save_pretrained(base)
    models = []
    for i in range(n):
        path = tmp_path / f"ft{i}"
        _perturbed(build(family, seed=0), seed=100 + i).save_pretrained(path)
        models.append(path)
    return base, models


def _tensors(path):
    from moekit.interop.hf import read_hf_tensors

    return read_hf_tensors(path)


@pytest.mark.parametrize("method", ["ta", "ties", "dare", "pcb"])
def test_cli_merges_hf_folders_into_a_loadable_model(tmp_path, capsys, method):
    from transformers import AutoModelForCausalLM

    base, models = _hf_folders(tmp_path, "llama")
    out = tmp_path / "merged"
    assert moekit_main(["merge", "--method", method, str(base), *map(str, models), "--out", str(out)]) == 0
    assert "-> " in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out)
    internal = {"dare": "dare_ties"}.get(method, method)
    expected = merge_state_dicts(_tensors(base), [_tensors(p) for p in models], internal)
    state = merged.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    ids = torch.tensor([[1, 2, 3, 4]])
    base_logits = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    assert (merged(ids).logits - base_logits).abs().max() > 1e-4  # the merge moved the model
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == internal and record["models"] == [str(p) for p in models]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "dbrx"])
def test_hf_moe_folders_are_merged_per_expert(tmp_path, family):
    """qwen3_moe is saved one tensor per expert, gpt-oss fused (E, ...) and DBRX fused (E*I, H):
    each expert keeps its own share in all three; one threshold over the fused tensor does not."""
    from transformers import AutoModelForCausalLM

    base, models = _hf_folders(tmp_path, family, dense=False)
    record = merge_checkpoints(base, models, tmp_path / "merged", "ties", density=0.25)
    assert (record["fused_expert_tensors"] > 0) == (family != "qwen3_moe")
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config
    count = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    count = count or config.ffn_config.moe_num_experts
    base_t, merged_t = _tensors(base), _tensors(tmp_path / "merged")

    def expert_rows(tensors):
        if family == "qwen3_moe":
            names = [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(count)]
            return torch.stack([tensors[n].flatten() for n in names])
        name = next(k for k in sorted(tensors) if ".experts." in k and tensors[k].dim() >= 2)
        return tensors[name].reshape(count, -1)

    moved = expert_rows(merged_t) - expert_rows(base_t)
    k = int(0.25 * moved.shape[1])
    kept = (moved != 0).sum(1)
    # two models' top quarters, united where their signs agree: between k/2-ish and 2k per expert
    assert bool((kept <= 2 * k).all()) and bool((kept >= k // 2).all()), kept.tolist()
    if family != "qwen3_moe":
        scaled = [{**_tensors(p)} for p in models]
        name = next(k for k in sorted(base_t) if ".experts." in k and base_t[k].dim() >= 2)
        big = torch.zeros(count, dtype=torch.float32)
        big[0] = 20.0  # expert 0's update dwarfs the others'
        for sd in scaled:
            update = (sd[name] - base_t[name]).reshape(count, -1) * (1 + big.view(-1, 1))
            sd[name] = base_t[name] + update.reshape(base_t[name].shape)
        per = merge_state_dicts(base_t, scaled, "ties", density=0.25, experts={name: count})[name]
        once = merge_state_dicts(base_t, scaled, "ties", density=0.25, experts={})[name]
        kept_per = ((per - base_t[name]).reshape(count, -1) != 0).sum(1)
        kept_once = ((once - base_t[name]).reshape(count, -1) != 0).sum(1)
        assert bool((kept_per[1:] > 0).all())
        assert kept_once[1:].sum() < kept_per[1:].sum() / 4  # expert 0 took the global budget


def _moe_run(tmp_path, name: str, seed: int | None, experts: int = 4, tokenizer: str = "byte"):
    from moekit.models.lm import LanguageModel, LMConfig
    from moekit.train.checkpoint import save_checkpoint

    config = LMConfig.from_dict(
        {
            "vocab_size": 259, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "ff_size": 48,
            "max_seq_len": 32, "moe": {"ff_size": 16, "router": {"num_experts": experts, "top_k": 2}},
        }
    )  # fmt: skip
    torch.manual_seed(0)
    model = LanguageModel(config)
    if seed is not None:
        _perturbed(model, seed)
    state = {
        "config": {"model": config.to_dict(), "data": {"source": "sample", "tokenizer": tokenizer}},
        "step": 3,
    }
    run = tmp_path / name
    save_checkpoint(run / "checkpoints" / "step-000003", model, None, state)
    return run, model


def test_moekit_runs_merge_into_a_run_the_trainer_can_load(tmp_path, capsys):
    from moekit.construct.lm import load_run_model

    base, base_model = _moe_run(tmp_path, "base", None)
    runs = [_moe_run(tmp_path, f"ft{i}", 10 + i) for i in range(2)]
    out = tmp_path / "merged"
    assert (
        moekit_main(["merge", "--method", "pcb", str(base), *(str(r) for r, _ in runs), "--out", str(out)])
        == 0
    )
    assert "fused expert tensors split per expert" in capsys.readouterr().out
    merged, state = load_run_model(out)
    expected = merge_state_dicts(base_model.state_dict(), [m.state_dict() for _, m in runs], "pcb")
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    assert state["merged_from"][0] == str(base)
    assert json.loads((out / "merge.json").read_text())["fused_expert_tensors"] > 0
    other, _ = _moe_run(tmp_path, "other", 1, experts=8)
    with pytest.raises(MoekitError, match=r"model.moe is .*(merging needs one architecture)"):
        merge_checkpoints(base, [other], tmp_path / "x", "ta")
    bpe, _ = _moe_run(tmp_path, "bpe", 1, tokenizer="bpe")
    with pytest.raises(MoekitError, match=r"data.tokenizer is 'bpe', .* has 'byte'"):
        merge_checkpoints(base, [bpe], tmp_path / "x", "ta")
    assert not (tmp_path / "x").exists()


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    base, models = _hf_folders(tmp_path, "llama", n=1)
    other = tmp_path / "other"
    from moekit.interop.tiny import tiny_dense_model

    tiny_dense_model("llama", intermediate_size=48).save_pretrained(other)
    tok = tmp_path / "tok"
    tiny_dense_model("llama").save_pretrained(tok)
    (base / "tokenizer.json").write_text('{"a": 1}')
    (tok / "tokenizer.json").write_text('{"a": 2}')
    run, _ = _moe_run(tmp_path, "run", 1)
    out = tmp_path / "new"
    capsys.readouterr()  # the set-up's progress bars
    cases = [
        ([str(base), str(other)], ["--method", "ta"], "'intermediate_size' is 48"),
        ([str(base), str(tok)], ["--method", "ta"], "must share one tokenizer"),
        ([str(base), str(run)], ["--method", "ta"], "is not a an HF folder like the base"),
        ([str(base), str(tmp_path / "nope")], ["--method", "ta"], "no such folder"),
        ([str(base), str(models[0])], ["--method", "ta", "--density", "0.5"], "--density: not a parameter"),
        ([str(base), str(models[0])], ["--method", "ties", "--density", "0"], "--density: got 0.0"),
        ([str(base), str(models[0])], ["--method", "dare", "--drop-rate", "1"], "--drop-rate: got 1.0"),
        ([str(base), str(models[0])], ["--method", "dare", "--seed", "-1"], "--seed: got -1"),
        (
            [str(base), str(models[0])],
            ["--method", "pcb", "--weights", "1", "2"],
            "--weights: got [1.0, 2.0]",
        ),
        ([str(base), str(models[0])], ["--method", "ta", "--dare-with", "ta"], "--dare-with: only applies"),
    ]
    for inputs, flags, message in cases:
        assert moekit_main(["merge", *inputs, "--out", str(out), *flags]) == 2, message
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    with pytest.raises(SystemExit) as info:
        moekit_main(["merge", "--method", "slerp", str(base), str(models[0]), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "invalid choice: 'slerp'" in err and len(err.splitlines()) == 1
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert moekit_main(["merge", "--method", "ta", str(base), str(models[0]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    # a shape mismatch the config does not show (edited weights) is named with the tensor
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    tiny_dense_model("llama").save_pretrained(bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoekitError, match=r"model.norm.weight has shape \(7,\)"):
        merge_checkpoints(base, [bad], tmp_path / "new2", "ta")
    assert not (tmp_path / "new2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def _all_families():
    from moekit.interop.tiny import TINY_CONFIGS

    return sorted(TINY_CONFIGS)


@pytest.mark.parametrize("family", _all_families())
def test_every_hf_moe_family_merges_into_a_loadable_model_that_moved(tmp_path, family):
    from transformers import AutoModelForCausalLM

    base, models = _hf_folders(tmp_path, family, dense=False)
    out = tmp_path / "merged"
    merge_checkpoints(base, models, out, "dare_ties", drop_rate=0.5, seed=3)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        logits = merged(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    assert bool(torch.isfinite(logits).all())
    assert float((logits - base_logits).abs().max()) > 1e-4
