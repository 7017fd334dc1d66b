"""Every shipped config validates and builds its model."""

from pathlib import Path

import pytest

from moekit.models.lm import LanguageModel
from moekit.train.config import RunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_builds(path):
    config = RunConfig.load(path)
    model = LanguageModel(config.model_config(vocab_size=259))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (config.model.get("moe") is None) == (not model.moe_layers)
