"""docs/config.md is generated from the config classes: current, complete, every key explained."""

import re
from dataclasses import fields
from pathlib import Path

from moekit.layer import MoEConfig
from moekit.models.lm import LMConfig
from moekit.routing.spec import RouterSpec
from moekit.train import config_docs
from moekit.train.config import DataConfig, LoopConfig, OptimConfig, ParallelConfig
from moekit.train.methods import MethodConfig

ROOT = Path(__file__).resolve().parents[1]


def test_committed_docs_are_current():
    assert config_docs.main(["--check", "--out", str(ROOT / config_docs.DOCS_PATH)]) == 0


def test_check_fails_on_stale_docs(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text(config_docs.render().replace("train.dtype", "train.precision"))
    assert config_docs.main(["--check", "--out", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_every_key_has_type_default_and_meaning():
    keys = [k for _, _, section in config_docs.all_sections() for k in section]
    assert len(keys) > 100
    for k in keys:
        assert k.type and k.default, k.path
        name = k.path.rsplit(".", 1)[-1]
        assert len(k.meaning) > 8 and not k.meaning.startswith(f"`{name}`"), (k.path, k.meaning)


def test_every_config_field_is_documented():
    documented = {k.path for _, _, section in config_docs.all_sections() for k in section}
    classes = {
        "data": DataConfig,
        "train": OptimConfig,
        "loop": LoopConfig,
        "parallel": ParallelConfig,
        "methods": MethodConfig,
        "model": LMConfig,
        "model.moe": MoEConfig,
        "model.moe.router": RouterSpec,
    }
    for prefix, cls in classes.items():
        for f in fields(cls):
            if (prefix, f.name) != ("model.moe", "hidden_size"):  # taken from model.hidden_size
                assert f"{prefix}.{f.name}" in documented, f"{prefix}.{f.name}"
    for _, _, cls in config_docs._option_classes():
        for f in fields(cls):
            assert any(p.endswith(f"_options.{f.name}") for p in documented), f.name


def test_allowed_values_are_listed_for_choices():
    keys = {k.path: k for _, _, section in config_docs.all_sections() for k in section}
    assert keys["train.dtype"].allowed == "fp32, bf16"
    assert keys["train.device"].allowed == "auto, cpu, cuda"
    assert "deepseek_v3" in keys["model.moe.router.preset"].allowed


def test_example_configs_named_in_the_docs_exist():
    text = config_docs.render()
    named = set(re.findall(r"`(configs/[\w.*-]+\.yaml)`", text))
    assert len(named) >= 7
    for pattern in named:
        assert list(ROOT.glob(pattern)), pattern
    kinds = {p.stem.removeprefix("router-") for p in ROOT.glob("configs/router-*.yaml")}
    assert len(kinds) >= 9  # every research router kind but top_p, which has configs/top-p.yaml
