"""Upcycling HF dense folders and moekit runs: receipts, step-0 equivalence with transformers
itself, bad input, and training on from the result (`model.init_from`)."""

import json

import pytest
import torch

pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
import transformers  # noqa: E402

from moekit.cli import main as moekit_main  # noqa: E402
from moekit.construct import hf as construct_hf  # noqa: E402
from moekit.construct.api import upcycle  # noqa: E402
from moekit.construct.hf import TARGETS, UpcycleRecipe  # noqa: E402
from moekit.construct.receipt import RECEIPT_FILE  # noqa: E402
from moekit.errors import ConfigError, MoekitError  # noqa: E402
from moekit.interop.tiny import TINY_DENSE_CONFIGS, tiny_dense_model  # noqa: E402
from moekit.models.lm import LanguageModel, LMConfig  # noqa: E402
from moekit.train.checkpoint import save_checkpoint  # noqa: E402

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))


def _dense_folder(tmp_path, family, dtype=torch.float64):
    folder = tmp_path / f"dense-{family}"
    tiny_dense_model(family).to(dtype).save_pretrained(folder)
    return folder


def _load(folder, dtype=torch.float64, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, experts_implementation="eager", **kwargs
    ).eval()


@pytest.mark.parametrize("family", list(TINY_DENSE_CONFIGS))
def test_copy_and_split_upcycles_compute_the_dense_model(tmp_path, family):
    src = _dense_folder(tmp_path, family)
    dense = _load(src)
    with torch.no_grad():
        want = dense(IDS).logits
    copy = upcycle(src, tmp_path / "copy", UpcycleRecipe(4, 2), corpus="sample")
    split = upcycle(src, tmp_path / "split", UpcycleRecipe(4, 2, method="split"), corpus="sample")
    assert copy["checks"]["step0_top_k"]["passed"] and split["checks"]["step0_all_experts"]["passed"]
    for folder in (tmp_path / "copy", tmp_path / "split"):
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == TARGETS[family].family and "auto_map" not in config
        assert json.loads((folder / RECEIPT_FILE).read_text())["format"] == "moekit-upcycle-receipt"
    with torch.no_grad():
        got_copy = _load(tmp_path / "copy")(IDS).logits
        all_on = _load(tmp_path / "split", num_experts_per_tok=4)(IDS).logits
        routed = _load(tmp_path / "split")(IDS).logits
    # HF routers compute the routing weights in fp32 even in a float64 model
    torch.testing.assert_close(got_copy, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(all_on, want, rtol=0, atol=1e-5)
    assert (routed - want).abs().max() > 1e-3  # top-2 of 4 parts is a different function


def test_fp32_copy_receipt_is_exact_to_1e_5_and_qwen2_shared_expert(tmp_path):
    src = _dense_folder(tmp_path, "qwen2", torch.float32)
    copy = upcycle(src, tmp_path / "copy", UpcycleRecipe(4, 2, shared=True), corpus="sample")
    split = upcycle(
        src,
        tmp_path / "split",
        UpcycleRecipe(4, 2, method="split", shared=True, shared_fraction=0.5),
        corpus="sample",
    )
    assert copy["checks"]["step0_top_k"]["max_abs_logit_diff"] < 1e-5
    assert split["checks"]["step0_all_experts"]["max_abs_logit_diff"] < 1e-5
    assert (
        json.loads((tmp_path / "split" / "config.json").read_text())["shared_expert_intermediate_size"] == 16
    )


def test_drop_noise_and_hidden_router_move_the_model_as_intended(tmp_path):
    src = _dense_folder(tmp_path, "llama")
    drop = upcycle(
        src, tmp_path / "drop", UpcycleRecipe(4, 2, method="drop", drop_ratio=0.5), corpus="sample"
    )
    noisy = upcycle(src, tmp_path / "noisy", UpcycleRecipe(4, 2, noise=1e-2), corpus="sample")
    assert drop["checks"]["step0_top_k"]["max_abs_logit_diff"] > 1e-2
    assert (
        1e-6
        < noisy["checks"]["step0_top_k"]["max_abs_logit_diff"]
        < drop["checks"]["step0_top_k"]["max_abs_logit_diff"]
    )
    # hidden: each expert's router row points at its own prompts' mean FFN input
    prompts = [["def f(x): return x + 1\n" * 3], ["The king spoke to the queen.\n" * 3]]
    upcycle(src, tmp_path / "hidden", UpcycleRecipe(2, 1, router="hidden"), prompts=prompts, corpus="sample")
    moe = _load(tmp_path / "hidden")
    inputs = {}
    hooks = [moe.model.layers[0].mlp.register_forward_pre_hook(lambda _m, a: inputs.setdefault("x", a[0]))]
    chosen = []
    for group in prompts:
        inputs.clear()
        ids = torch.tensor([[b % 128 for b in group[0].encode()]])
        with torch.no_grad():
            moe(ids)
        logits = inputs["x"].reshape(-1, 32) @ moe.model.layers[0].mlp.gate.weight.T
        chosen.append(logits.mean(0).argmax().item())
    for h in hooks:
        h.remove()
    assert chosen == [0, 1]


def test_an_upcycle_that_does_not_compute_the_dense_model_writes_nothing(tmp_path, monkeypatch):
    """FusionBench's silent failure (experts left at random init) is caught by the receipt."""
    src = _dense_folder(tmp_path, "qwen3")
    real = construct_hf._fill_moe_block

    def forget_the_experts(block, experts, router, family):
        real(block, experts, router, family)
        block.experts.down_proj.mul_(0.5)

    monkeypatch.setattr(construct_hf, "_fill_moe_block", forget_the_experts)
    with pytest.raises(MoekitError, match="step0_top_k check failed.*nothing written"):
        upcycle(src, tmp_path / "out", UpcycleRecipe(4, 2), corpus="sample")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [src.name]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    src = _dense_folder(tmp_path, "llama", torch.float32)
    moe = tmp_path / "moe"
    upcycle(src, moe, UpcycleRecipe(2, 1), corpus="sample")
    capsys.readouterr()  # transformers' progress bars
    cases = [
        (
            [str(moe), "--experts", "2", "--top-k", "1"],
            "model_type 'mixtral' is not a supported dense family",
        ),
        ([str(src), "--experts", "5", "--top-k", "1", "--method", "split"], "do not divide into 5 experts"),
        ([str(src), "--experts", "2", "--top-k", "3"], "--top-k: got 3, expected at most experts=2"),
        (
            [str(src), "--experts", "2", "--top-k", "1", "--seed", "-1"],
            "--seed: got -1, expected an integer >= 0",
        ),
        ([str(src), "--experts", "2", "--top-k", "1", "--corpus", str(tmp_path / "nope")], "--corpus: got"),
        ([str(src), "--experts", "2", "--top-k", "1", "--shared"], "mixtral has no shared expert"),
        ([str(tmp_path / "nothing"), "--experts", "2", "--top-k", "1"], "no such folder"),
    ]
    for args, message in cases:
        assert moekit_main(["upcycle", *args, "--out", str(tmp_path / "new")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "new").exists()
    assert moekit_main(["upcycle", str(src), "--experts", "2", "--top-k", "1", "--out", str(moe)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="router"):
        UpcycleRecipe(2, 1, router="kmeans")


def _dense_run(tmp_path, seed=0):
    config = LMConfig(
        vocab_size=259, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ff_size=48, max_seq_len=64
    )
    torch.manual_seed(seed)
    model = LanguageModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10) if p.dim() > 1 else p.normal_(1.0, 0.2)
    state = {
        "config": {"model": config.to_dict(), "data": {"source": "sample", "tokenizer": "byte"}},
        "step": 7,
    }
    run = tmp_path / "dense-run"
    save_checkpoint(run / "checkpoints" / "step-000007", model, None, state)
    return run, model


def test_moekit_runs_upcycle_with_receipts_and_train_on(tmp_path, capsys):
    run, dense = _dense_run(tmp_path)
    args = ["upcycle", str(run), "--experts", "4", "--top-k", "2", "--corpus", "sample"]
    assert moekit_main([*args, "--out", str(tmp_path / "copy")]) == 0
    out = capsys.readouterr().out
    assert "exact: ok" in out and "receipt:" in out
    split = upcycle(
        run, tmp_path / "split", UpcycleRecipe(4, 2, method="split", shared=True), corpus="sample"
    )
    assert split["checks"]["step0_all_experts"]["passed"]
    assert split["checks"]["step0_top_k"]["max_abs_logit_diff"] > 1e-4

    from moekit.train.config import RunConfig
    from moekit.train.trainer import Trainer

    config = RunConfig.from_dict(
        {
            "name": "on",
            "out_dir": str(tmp_path / "on"),
            "model": {"init_from": str(tmp_path / "copy")},
            "data": {"source": "sample", "seq_len": 32},
            "train": {"steps": 2, "micro_batch_size": 2, "warmup_steps": 0},
            "loop": {"progress": False, "log_every": 1},
        }
    )
    trainer = Trainer(config, log=lambda _: None)
    assert trainer.model_config.moe.router.num_experts == 4
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(IDS).logits, dense(IDS).logits, rtol=0, atol=1e-4)
    trainer.run()
    assert trainer.step == 2
    with pytest.raises(ConfigError, match="model.init_from"):
        RunConfig.from_dict({"model": {"init_from": str(tmp_path / "missing")}})


def test_moekit_run_exports_to_hf_and_hf_checkpoints_start_runs(tmp_path, capsys):
    run, dense = _dense_run(tmp_path)
    upcycle(run, tmp_path / "moe", UpcycleRecipe(4, 2), corpus="sample")
    assert moekit_main(["convert", "to-hf", str(tmp_path / "moe"), str(tmp_path / "hf")]) == 0
    assert "mixtral" in capsys.readouterr().out
    hf = _load(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, dense(IDS).logits, rtol=0, atol=1e-4)

    from moekit.train.config import RunConfig

    config = RunConfig.from_dict({"model": {"init_from": str(tmp_path / "hf")}})
    assert config.model_config(259).moe.router.top_k == 2


def test_moekit_run_hidden_router_and_cluster_split_read_the_calibration_pass(tmp_path):
    """The calibration pass on moekit's LM: with a `hidden` router each expert's row points at its
    own prompts' mean FFN input, and a `cluster` split (activations on training text) still
    computes the dense model with every expert on."""
    from moekit.construct.lm import load_run_model
    from moekit.data.tokenizer import ByteTokenizer

    run, _ = _dense_run(tmp_path)
    prompts = [["def f(x): return x + 1\n" * 2], ["The king spoke to the queen.\n" * 2]]
    cluster = UpcycleRecipe(2, 1, method="split", partition="cluster")
    split = upcycle(run, tmp_path / "cluster", cluster, corpus="sample")
    assert split["checks"]["step0_all_experts"]["passed"]
    recipe = UpcycleRecipe(2, 1, router="hidden")
    upcycle(run, tmp_path / "hidden", recipe, prompts=prompts, corpus="sample")
    moe, _ = load_run_model(tmp_path / "hidden")
    ffn = moe.blocks[0].ffn
    inputs = {}
    # the MoE FFN is called through forward_with_routing; its input is the FFN norm's output
    hook = moe.blocks[0].ffn_norm.register_forward_hook(lambda _m, _a, out: inputs.setdefault("x", out))
    chosen = []
    try:
        for group in prompts:
            inputs.clear()
            with torch.no_grad():
                moe(torch.tensor([ByteTokenizer().encode(group[0])]))
            logits = inputs["x"].reshape(-1, 32) @ ffn.router.weight.T
            chosen.append(logits.mean(0).argmax().item())
    finally:
        hook.remove()
    assert chosen == [0, 1]
    with pytest.raises(ConfigError, match="prompts: got 1 prompt lists, expected one per expert"):
        upcycle(run, tmp_path / "one", recipe, prompts=prompts[:1], corpus="sample")
