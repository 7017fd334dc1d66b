"""The decoder LM: shapes, packing isolation, parameter counts, config errors."""

import pytest
import torch

from moekit.errors import ConfigError
from moekit.layer import MoEConfig
from moekit.models.lm import LanguageModel, LMConfig, count_parameters
from moekit.routing.spec import preset

pytestmark = [pytest.mark.production_threads, pytest.mark.portable]


def tiny(moe: bool = True, **overrides) -> LanguageModel:
    moe_config = (
        MoEConfig(hidden_size=32, ff_size=16, router=preset("qwen3_moe", 4, 2), num_shared_experts=1)
        if moe
        else None
    )
    values = dict(
        vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, ff_size=48, max_seq_len=16, moe=moe_config
    )
    values.update(overrides)
    return LanguageModel(LMConfig(**values)).double()


def test_layer_pattern_and_routings():
    model = tiny(first_dense_layers=1, moe_every=1)
    assert [b.is_moe for b in model.blocks] == [False, True, True]
    out = model(torch.randint(0, 50, (2, 16)))
    assert out.logits.shape == (2, 16, 50)
    assert len(out.routings) == 2 and all(r.num_tokens == 32 for r in out.routings)


def test_packed_documents_do_not_see_each_other():
    """A packed row with two documents gives each document the logits it gets alone."""
    model = tiny().eval()
    a, b = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 9))
    row = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    positions = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0)
    packed = model(row, positions=positions, doc_ids=doc_ids).logits
    alone_a = model(a).logits
    alone_b = model(b).logits
    torch.testing.assert_close(packed[:, :7], alone_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed[:, 7:], alone_b, rtol=1e-10, atol=1e-10)


def test_causality():
    model = tiny().eval()
    ids = torch.randint(0, 50, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    torch.testing.assert_close(model(ids).logits[:, :8], model(changed).logits[:, :8], rtol=1e-10, atol=1e-10)


def test_active_parameters_count_top_k_experts_only():
    model = tiny()
    counts = count_parameters(model)
    per_expert = 2 * 16 * 32 + 32 * 16
    assert counts.total - counts.active == 3 * (4 - 2) * per_expert
    dense = count_parameters(tiny(moe=False))
    assert dense.total == dense.active


@pytest.mark.parametrize(
    "field,overrides",
    [
        ("model.num_heads", dict(num_heads=5)),
        ("model.num_kv_heads", dict(num_kv_heads=3)),
        ("model.hidden_size", dict(hidden_size=0)),
    ],
)
def test_config_errors_name_the_field(field, overrides):
    values = dict(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, ff_size=8, max_seq_len=8)
    values.update(overrides)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        LMConfig(**values)
