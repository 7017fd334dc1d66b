"""A loud warning when an MoE is about to be trained with every balancing mechanism switched off.

Auxiliary losses that are silently off or zero are a classic (moe-systems.md P4: transformers#44242,
Megatron-Bridge#5165, NeMo#1408): the router then collapses onto a few experts and nothing says so.
The balancing mechanisms moekit knows are a `load_balance` objective with a coefficient that is not
zero at every step, and aux-loss-free bias updates (a non-zero rate *and* a router with a selection
bias). Capacity limits drop tokens but do not teach the router to balance, so they do not count.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn

from moekit.balance.bias import has_selection_bias, moe_routers
from moekit.balance.config import BalanceConfig

logger = logging.getLogger("moekit.balance")


class BalancingDisabledWarning(UserWarning):
    """An MoE model is trained without any load-balancing mechanism."""


def balancing_mechanisms(model: nn.Module, config: BalanceConfig) -> list[str]:
    """Names of the balancing mechanisms that are on for this model and config."""
    active = [
        f"objective {spec.name}"
        for spec in config.objectives
        if spec.kind == "load_balance" and not spec.coefficient.always_zero
    ]
    if not config.bias_update_rate.always_zero and has_selection_bias(model):
        active.append("aux-loss-free selection-bias updates")
    return active


def warn_if_unbalanced(model: nn.Module, config: BalanceConfig) -> bool:
    """Warn (BalancingDisabledWarning + an error-level log record) if `model` has MoE routers and
    no balancing mechanism is on; returns whether it warned. Call it once before training."""
    if not moe_routers(model) or balancing_mechanisms(model, config):
        return False
    reasons = ["no load_balance objective has a non-zero coefficient"]
    if config.bias_update_rate.always_zero:
        reasons.append("balance.bias_update_rate is 0")
    else:
        reasons.append(
            "balance.bias_update_rate is set but no router has a selection bias (router.selection_bias)"
        )
    message = (
        "training an MoE with every load-balancing mechanism off (" + "; ".join(reasons) + "): the router "
        "may collapse onto a few experts. Add e.g. {kind: load_balance, scope: global, coefficient: 0.01} "
        "to balance.objectives, or enable router.selection_bias with balance.bias_update_rate: 0.001."
    )
    logger.error(message)
    warnings.warn(message, BalancingDisabledWarning, stacklevel=2)
    return True
