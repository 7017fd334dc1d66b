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


def _unknown_field_cases():
    from moekit.balance.config import BalanceConfig, ObjectiveSpec
    from moekit.balance.schedule import Schedule
    from moekit.compress.recipe import recipe_from_dict
    from moekit.config_tree import dataclass_from_dict
    from moekit.domains.recipe import BuildRecipe
    from moekit.interop.model import FamilyConfig
    from moekit.layer import MoEConfig
    from moekit.models.attention_experts import AttentionExpertsConfig
    from moekit.models.lm import LMConfig
    from moekit.routing.spec import RouterSpec, router_spec_from_dict

    router = {"num_experts": 4, "top_k": 2}
    return [
        (lambda: RouterSpec.from_dict({**router, "topk": 1}), "router.topk"),
        (lambda: router_spec_from_dict({**router, "preset": "mixtral", "topk": 1}), "router.topk"),
        (lambda: MoEConfig.from_dict({"hidden_size": 8, "ff_size": 8, "router": router, "x": 1}), "moe.x"),
        (lambda: LMConfig.from_dict({"vocab_size": 9, "hiden_size": 8}), "model.hiden_size"),
        (lambda: FamilyConfig.from_dict({"zz": 1}), "family.zz"),
        (lambda: dataclass_from_dict(AttentionExpertsConfig, {"zz": 1}, "attn"), "attn.zz"),
        (
            lambda: ObjectiveSpec.from_dict({"kind": "aux", "zz": 1}, "balance.objectives[0]"),
            "balance.objectives[0].zz",
        ),
        (lambda: BalanceConfig.from_dict({"zz": 1}), "balance.zz"),
        (lambda: Schedule.from_value({"kind": "constant", "zz": 1}), "coefficient.zz"),
        (lambda: recipe_from_dict({"method": "prune", "prune": {"keepers": 2}}), "prune.keepers"),
        (lambda: recipe_from_dict({"method": "prune", "whatever": 1}), "whatever"),
        (lambda: BuildRecipe.from_dict({"domains": [], "zz": 1}), "zz"),
    ]


def test_an_unknown_field_is_named_with_its_path_and_the_known_ones_listed():
    """Every config reader refuses a misspelt key the same way: `path.key: unknown field; expected
    one of a, b, ...` (the known fields in alphabetical order)."""
    from moekit.errors import ConfigError

    for build, field in _unknown_field_cases():
        with pytest.raises(ConfigError) as caught:
            build()
        assert caught.value.field == field
        message = str(caught.value)
        assert message.startswith(f"{field}: unknown field; expected one of ")
        listed = message.split("expected one of ", 1)[1].split(", ")
        assert listed == sorted(listed) and field.rsplit(".", 1)[-1] not in listed
