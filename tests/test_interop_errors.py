"""Bad checkpoints and bad requests get errors that name the file, tensor or field; folders are
written atomically and never replaced unless asked."""

import dataclasses
import json

import pytest
import torch

pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
from safetensors.torch import load_file, save_file  # noqa: E402

from moekit.errors import ConfigError, MoekitError  # noqa: E402
from moekit.interop import hf as hf_io  # noqa: E402
from moekit.interop.hf import from_hf, load_family, save_family, to_hf  # noqa: E402
from moekit.interop.model import FamilyModel  # noqa: E402
from moekit.interop.tiny import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    tiny_model("qwen3_moe").save_pretrained(folder)
    return folder


def _copy(src, dst, edit_config=None, edit_tensors=None):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_unsupported_architecture_lists_the_supported_ones(qwen3_folder, tmp_path):
    folder = _copy(qwen3_folder, tmp_path / "llama", edit_config=lambda c: c.update(model_type="llama"))
    with pytest.raises(MoekitError) as err:
        from_hf(folder)
    message = str(err.value)
    assert "config.json: model_type 'llama' is not a supported MoE family" in message
    for name in (
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v3",
        "gpt_oss",
        "granitemoe",
        "dbrx",
        "llama4_text",
    ):
        assert name in message


def test_missing_folder_config_and_pickle_weights(qwen3_folder, tmp_path):
    with pytest.raises(MoekitError, match="expected an HF model folder"):
        from_hf(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoekitError, match="config.json: HF config not found"):
        from_hf(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((qwen3_folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(MoekitError, match="only pickle weights .* moekit reads safetensors only"):
        from_hf(pickled)


def test_missing_unexpected_and_misshapen_tensors_are_named(qwen3_folder, tmp_path):
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    folder = _copy(qwen3_folder, tmp_path / "missing", edit_tensors=lambda t: t.pop(key))
    with pytest.raises(MoekitError, match=f"missing tensors for a qwen3_moe model .*{key}"):
        from_hf(folder)
    folder = _copy(qwen3_folder, tmp_path / "extra", edit_tensors=lambda t: t.update(stray=torch.zeros(2)))
    with pytest.raises(MoekitError, match="tensors a qwen3_moe model does not have: stray"):
        from_hf(folder)
    folder = _copy(qwen3_folder, tmp_path / "narrow", edit_config=lambda c: c.update(moe_intermediate_size=8))
    with pytest.raises(
        MoekitError, match=r"layers.0.ffn.experts.w_in has shape \(8, 32, 32\), the config implies"
    ):
        from_hf(folder)
    folder = _copy(qwen3_folder, tmp_path / "corrupt")
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(MoekitError, match="not a readable safetensors file"):
        from_hf(folder)


def test_config_fields_moekit_cannot_run_are_named(qwen3_folder, tmp_path):
    folder = _copy(qwen3_folder, tmp_path / "gelu", edit_config=lambda c: c.update(hidden_act="gelu"))
    with pytest.raises(ConfigError, match="config.json: hidden_act: got 'gelu'"):
        from_hf(folder)

    def dynamic_rope(config):
        config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}

    folder = _copy(qwen3_folder, tmp_path / "rope", edit_config=dynamic_rope)
    with pytest.raises(
        ConfigError, match="rope_parameters.rope_type: got 'dynamic'; moekit supports default"
    ):
        from_hf(folder)


def test_a_config_transformers_rejects_is_named(qwen3_folder, tmp_path):
    folder = _copy(qwen3_folder, tmp_path / "bad", edit_config=lambda c: c.update(hidden_size="wide"))
    with pytest.raises(MoekitError, match="config.json: transformers rejects it as a Qwen3MoeConfig"):
        from_hf(folder)


def test_existing_destination_is_kept_unless_overwrite(qwen3_folder, tmp_path):
    model = from_hf(qwen3_folder)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(MoekitError, match="already exists"):
        to_hf(model, dst)
    assert (dst / "keep.txt").read_text() == "mine"
    to_hf(model, dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_an_interrupted_export_leaves_nothing_behind(qwen3_folder, tmp_path, monkeypatch):
    model = from_hf(qwen3_folder)

    def fail(path, tensors):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "_save_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        to_hf(model, tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        save_family(model, tmp_path / "ours")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_replacement_puts_the_previous_folder_back(qwen3_folder, tmp_path, monkeypatch):
    model = from_hf(qwen3_folder)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    real_replace = hf_io.os.replace

    def replace(src, target):
        if str(src).endswith(".tmp"):  # moving the new folder into place fails
            raise OSError("rename failed")
        real_replace(src, target)

    monkeypatch.setattr(hf_io.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        to_hf(model, dst, overwrite=True)
    assert (dst / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_wrong_kind_of_folder_or_model(qwen3_folder, tmp_path):
    model = from_hf(qwen3_folder)
    save_family(model, tmp_path / "ours")
    with pytest.raises(MoekitError, match="moekit family checkpoint; load it with"):
        from_hf(tmp_path / "ours")
    with pytest.raises(MoekitError, match="this is an HF folder, not a moekit family checkpoint"):
        load_family(qwen3_folder)
    with pytest.raises(MoekitError, match="expected a moekit FamilyModel"):
        to_hf(torch.nn.Linear(2, 2), tmp_path / "x")
    document = json.loads((tmp_path / "ours" / "moekit_family.json").read_text())
    document["version"] = 99
    (tmp_path / "ours" / "moekit_family.json").write_text(json.dumps(document))
    with pytest.raises(MoekitError, match="version 99, this moekit reads version 1"):
        load_family(tmp_path / "ours")


def test_a_model_the_family_cannot_express_is_refused(qwen3_folder, tmp_path):
    model = from_hf(qwen3_folder)
    config = dataclasses.replace(model.config, windows=(None, 8))  # Qwen3-MoE has one window for all layers
    odd = FamilyModel(config)
    with pytest.raises(
        ConfigError, match="family.windows: qwen3_moe applies one sliding window to every layer"
    ):
        to_hf(odd, tmp_path / "out")
    config = dataclasses.replace(model.config, norm="layer")
    with pytest.raises(ConfigError, match="family.norm: this model cannot be expressed as a Qwen3MoeConfig"):
        to_hf(FamilyModel(config), tmp_path / "out")
