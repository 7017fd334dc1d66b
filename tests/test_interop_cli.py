"""`moekit convert from-hf / to-hf` (the subcommand's own parser and main, as the CLI wires them)."""

import argparse

import pytest
import torch

pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from moekit.errors import MoekitError  # noqa: E402
from moekit.interop import cli  # noqa: E402
from moekit.interop.tiny import tiny_model  # noqa: E402


def _convert(*argv):
    parser = argparse.ArgumentParser(prog="moekit convert")
    cli.add_arguments(parser)
    return cli.main(parser.parse_args([str(a) for a in argv]))


def test_convert_both_directions_round_trips(tmp_path, capsys):
    src = tmp_path / "hf"
    tiny_model("olmoe").save_pretrained(src)
    assert _convert("from-hf", src, tmp_path / "ours") == 0
    assert "olmoe, 2 layers (2 MoE, 8 experts top-2)" in capsys.readouterr().out
    assert (tmp_path / "ours" / "moekit_family.json").is_file()
    assert _convert("to-hf", tmp_path / "ours", tmp_path / "back") == 0
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")


def test_to_hf_relayouts_an_hf_folder_and_casts(tmp_path):
    src = tmp_path / "hf"
    tiny_model("mixtral").save_pretrained(src)  # per-expert keys, as save_pretrained writes by default
    _convert("to-hf", src, tmp_path / "packed", "--layout", "packed", "--dtype", "bfloat16")
    tensors = load_file(tmp_path / "packed" / "model.safetensors")
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 32, 32)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_refusals_are_moekit_errors(tmp_path):
    src = tmp_path / "hf"
    tiny_model("qwen3_moe").save_pretrained(src)
    (tmp_path / "taken").mkdir()
    with pytest.raises(MoekitError, match="already exists"):
        _convert("from-hf", src, tmp_path / "taken")
    config = (src / "config.json").read_text().replace('"qwen3_moe"', '"jamba"')
    (src / "config.json").write_text(config)
    with pytest.raises(MoekitError, match="'jamba' is not a supported MoE family; supported: mixtral"):
        _convert("from-hf", src, tmp_path / "out")
