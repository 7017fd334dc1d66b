"""DeepSeek-V3 aux-loss-free bias: fp32 whatever the model dtype, outside the optimizer, saved with
the model, moved toward balance; and the warning for an MoE trained with no balancing at all."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
import torch
from torch import nn

from moekit import MoE, MoEConfig, preset
from moekit.balance import (
    BalanceConfig,
    BalancingDisabledWarning,
    ObjectiveSpec,
    Schedule,
    apply_bias_updates,
    diagnose,
    sign_update,
    warn_if_unbalanced,
)
from moekit.errors import MoekitError

HIDDEN = 8


def deepseek_moe(num_experts: int = 6, k: int = 2) -> MoE:
    return MoE(MoEConfig(HIDDEN, 4, preset("deepseek_v3", num_experts, k)))


def test_sign_update_moves_against_the_load():
    update = sign_update(torch.tensor([5, 1, 3, 3]), 0.01)  # mean load 3
    assert update.dtype == torch.float32
    torch.testing.assert_close(update, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


def test_sign_update_is_exact_where_a_float_mean_would_round():
    """Loads (a, a, a+1) with a = 2^60: the mean a + 1/3 rounds to a in float64, which would leave
    the first two experts unmoved; the integer comparison raises both."""
    a = 2**60
    counts = torch.tensor([a, a, a + 1], dtype=torch.int64)
    assert float(counts.double().mean()) == float(a)
    assert sign_update(counts, 1.0).tolist() == [1.0, 1.0, -1.0]
    with pytest.raises(MoekitError, match="integer"):
        sign_update(counts.float(), 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bias_stays_fp32_when_the_model_is_cast(dtype):
    layer = deepseek_moe().to(dtype)
    assert layer.router.weight.dtype == dtype
    assert layer.router.selection_bias.dtype == torch.float32
    assert layer.double().router.selection_bias.dtype == torch.float64  # never narrower than the model


def test_bias_values_survive_a_cast_to_bf16():
    layer = deepseek_moe()
    with torch.no_grad():
        layer.router.selection_bias.copy_(torch.linspace(-0.3, 0.3, 6) + 1e-4)
    before = layer.router.selection_bias.clone()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.router.selection_bias, before)


def test_bias_is_not_a_parameter_so_no_optimizer_touches_it():
    layer = deepseek_moe()
    bias = layer.router.selection_bias
    assert all(p is not bias for p in layer.parameters())
    with torch.no_grad():
        bias.fill_(0.5)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.5)
    y = layer(torch.randn(5, HIDDEN))
    y.square().sum().backward()
    optimizer.step()
    assert torch.equal(bias, torch.full_like(bias, 0.5))


def test_bias_is_saved_and_restored_with_the_state_dict():
    layer = deepseek_moe()
    with torch.no_grad():
        layer.router.selection_bias.normal_()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    restored = deepseek_moe()
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert "router.selection_bias" in layer.state_dict()
    assert torch.equal(restored.router.selection_bias, layer.router.selection_bias)
    assert restored.router.selection_bias.dtype == torch.float32


def test_bias_updates_balance_a_skewed_router():
    """A router that prefers expert 0: each update lowers the bias of overloaded experts and raises
    that of idle ones, and repeated updates bring max/mean load close to 1."""
    torch.manual_seed(0)
    model = nn.Sequential(deepseek_moe(num_experts=4, k=1))
    router = model[0].router
    with torch.no_grad():
        router.weight[0] += 1.5
    x = torch.randn(256, HIDDEN).abs()
    initial = diagnose(router(x))
    assert initial.max_over_mean_load > 2.0
    counts = router(x).chosen_counts
    before = router.selection_bias.clone()
    apply_bias_updates(model, [counts], 0.01)
    moved = router.selection_bias - before
    mean = counts.sum() / counts.numel()
    assert torch.all(moved[counts > mean] < 0) and torch.all(moved[counts < mean] > 0)
    for _ in range(400):
        apply_bias_updates(model, [router(x).chosen_counts], 0.01)
    assert diagnose(router(x)).max_over_mean_load < 1.3
    assert router.selection_bias.dtype == torch.float32


def test_bias_update_checks_its_inputs():
    model = nn.Sequential(deepseek_moe(), MoE(MoEConfig(HIDDEN, 4, preset("mixtral", 6, 2))))
    counts = torch.tensor([1, 2, 3, 4, 5, 6])
    assert apply_bias_updates(model, [counts, counts], 0.1) == 1  # the mixtral router has no bias
    with pytest.raises(MoekitError, match="2 MoE layers"):
        apply_bias_updates(model, [counts], 0.1)
    with pytest.raises(MoekitError, match="selection_bias"):
        apply_bias_updates(model, [counts[:4], counts], 0.1)
    model[0].router.selection_bias = torch.zeros(6, dtype=torch.bfloat16)
    with pytest.raises(MoekitError, match="fp32"):
        apply_bias_updates(model, [counts, counts], 0.1)


# --- the all-balancing-off warning --------------------------------------------------------------


def lb(coefficient) -> ObjectiveSpec:
    return ObjectiveSpec("load_balance", "global", Schedule.from_value(coefficient))


def mixtral_model() -> nn.Module:
    return nn.Sequential(MoE(MoEConfig(HIDDEN, 4, preset("mixtral", 4, 2))))


@pytest.mark.parametrize(
    "model, config",
    [
        (mixtral_model, BalanceConfig()),
        (mixtral_model, BalanceConfig((lb(0.0),))),
        (mixtral_model, BalanceConfig((ObjectiveSpec("z_loss", "global", Schedule.constant(1e-3)),))),
        (mixtral_model, BalanceConfig(bias_update_rate=Schedule.constant(0.001))),  # no bias to update
        (lambda: nn.Sequential(deepseek_moe()), BalanceConfig()),  # a bias that is never updated
    ],
)
def test_warns_loudly_when_every_balancing_mechanism_is_off(model, config, caplog):
    with caplog.at_level(logging.WARNING, logger="moekit.balance"), pytest.warns(BalancingDisabledWarning):
        assert warn_if_unbalanced(model(), config)
    assert any(
        r.levelno >= logging.WARNING and "every load-balancing mechanism off" in r.message
        for r in caplog.records
    )


@pytest.mark.parametrize(
    "model, config",
    [
        (mixtral_model, BalanceConfig((lb(0.01),))),
        (mixtral_model, BalanceConfig((lb({"kind": "linear", "start": 0.01, "end": 0.0, "steps": 100}),))),
        (lambda: nn.Sequential(deepseek_moe()), BalanceConfig(bias_update_rate=Schedule.constant(0.001))),
        (lambda: nn.Linear(4, 4), BalanceConfig()),  # not an MoE
    ],
)
def test_does_not_warn_when_a_mechanism_is_on(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_unbalanced(model(), config)
