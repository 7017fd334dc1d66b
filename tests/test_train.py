"""The trainer: bit-identical resumption, checkpoints, config errors, the CLI."""

import json

import pytest
import torch
import yaml

from moekit.cli import main as cli_main
from moekit.data.lmdata import prepare_data
from moekit.errors import ConfigError, MoekitError
from moekit.io import check_tensor_names
from moekit.train.checkpoint import load_checkpoint, load_model_tensors, resolve_checkpoint
from moekit.train.config import RunConfig
from moekit.train.trainer import Trainer

pytestmark = [pytest.mark.production_threads, pytest.mark.portable]


@pytest.fixture(scope="module")
def sample_data():
    return prepare_data("sample", log=lambda _: None)


def tiny_config(tmp_path, **train) -> RunConfig:
    return RunConfig.from_dict(
        {
            "name": "t",
            "out_dir": str(tmp_path),
            "model": {
                "vocab_size": "auto",
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 2,
                "ff_size": 64,
                "max_seq_len": 32,
                "moe": {
                    "ff_size": 16,
                    "router": {
                        "preset": "deepseek_v3",
                        "num_experts": 8,
                        "top_k": 2,
                        "num_groups": 2,
                        "topk_groups": 1,
                    },
                    "num_shared_experts": 1,
                },
            },
            "data": {"source": "sample", "seq_len": 32},
            "train": {"steps": 6, "micro_batch_size": 4, "grad_accum": 2, "warmup_steps": 2, **train},
            "loop": {"log_every": 1, "eval_batches": 1, "progress": False},
            "balance": {
                "objectives": [{"kind": "load_balance", "scope": "global", "coefficient": 0.01}],
                "bias_update_rate": 0.01,
            },
        }
    )


def test_resume_continues_bit_identically(tmp_path, sample_data):
    straight = Trainer(tiny_config(tmp_path / "a"), data=sample_data, log=lambda _: None)
    straight.run()

    first = Trainer(tiny_config(tmp_path / "b"), data=sample_data, log=lambda _: None)
    first.run(max_steps=3)
    assert first.step == 3
    # a fresh process would start from scratch: new trainer, different RNG state
    torch.manual_seed(12345)
    second = Trainer(tiny_config(tmp_path / "b"), data=sample_data, log=lambda _: None)
    second.resume(tmp_path / "b")
    assert second.step == 3
    second.run()

    a, b = straight.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the aux-loss-free bias moved and was restored with the checkpoint
    bias = [k for k in a if k.endswith("selection_bias")]
    assert bias and all(torch.count_nonzero(a[k]) > 0 for k in bias)


def test_checkpoint_round_trip_and_metrics(tmp_path, sample_data):
    trainer = Trainer(tiny_config(tmp_path, steps=2), data=sample_data, log=lambda _: None)
    result = trainer.run()
    directory = resolve_checkpoint(tmp_path)
    fresh = Trainer(tiny_config(tmp_path / "other", steps=2), data=sample_data, log=lambda _: None)
    load_checkpoint(directory, fresh.model)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, fresh.model.state_dict()[name]), name
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train/lm_loss" in r] == [1, 2]
    assert set(result.val_loss) == {*sample_data.domains, "mean"}


def test_tensor_files_of_another_model_are_refused_naming_the_tensors():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight  # tied: the file may hold it once
    load_model_tensors(model, {"0.weight": torch.ones(5, 4)}, "one.safetensors")
    assert torch.equal(model[1].weight, torch.ones(5, 4))
    load_model_tensors(model, {"0.weight": torch.zeros(5, 4), "1.weight": torch.zeros(5, 4)}, "both")
    refused = r"^f: does not match the model "
    with pytest.raises(MoekitError, match=refused + r"\(missing 0\.weight; unexpected stray\)$"):
        load_model_tensors(model, {"1.weight": torch.zeros(5, 4), "stray": torch.zeros(1)}, "f")
    with pytest.raises(MoekitError, match=refused + r"\(missing a, b\)$"):  # no "unexpected" part
        check_tensor_names("f", ["a", "b", "c"], ["c"])
    with pytest.raises(MoekitError, match=r"^f: 0\.weight has shape \(4, 4\), the model expects \(5, 4\)$"):
        load_model_tensors(model, {"0.weight": torch.zeros(4, 4)}, "f")


def test_config_errors_name_the_field(tmp_path):
    config = tiny_config(tmp_path).to_dict()
    config["train"]["lr"] = "fast"
    with pytest.raises(ConfigError, match=r"train\.lr"):
        RunConfig.from_dict(config)
    config = tiny_config(tmp_path).to_dict()
    config["model"]["moe"]["router"]["top_k"] = 99
    with pytest.raises(ConfigError, match=r"router\.top_k"):
        RunConfig.from_dict(config)


def test_min_lr_ratio_is_a_fraction_of_lr(tmp_path):
    """The cosine schedule ends at min_lr_ratio x lr: a ratio above 1 would end above the peak."""
    for ratio in (0, 0.5, 1):
        assert tiny_config(tmp_path, min_lr_ratio=ratio).train.min_lr_ratio == ratio
    for ratio in (1.01, 2, -0.1):
        with pytest.raises(ConfigError, match=r"^train\.min_lr_ratio: got .*expected a number"):
            tiny_config(tmp_path, min_lr_ratio=ratio)


def test_cli_rejects_min_lr_ratio_above_one_in_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**tiny_config(tmp_path / "out").to_dict(), "loop": {"progress": False}}))
    assert cli_main(["train", "--config", str(path), "--set", "train.min_lr_ratio=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.min_lr_ratio" in err and "[0, 1]" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_config_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {hidden_size: 32}\ntrain: {stepz: 3}\n")
    assert cli_main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "Traceback" not in err
