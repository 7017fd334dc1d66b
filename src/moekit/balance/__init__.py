"""Load-balancing objectives that give the same values and gradients however a batch is split.

- `objectives`: the formulas (Switch/GShard LBL, DeepSeek-V3 sequence aux, global-batch LBL,
  ST-MoE z-loss, dynamic-routing entropy) as pure functions of explicit statistics.
- `stats`: those statistics from a `Routing`, over real tokens, summable and all-reducible.
- `config`, `schedule`: which objectives, at which scope, with which coefficient schedule.
- `step`: `accumulate_gradients`, one optimizer step of forward/backward with global normalisers.
- `bias`: DeepSeek-V3 aux-loss-free selection-bias updates.
- `diagnostics`: per-layer load CV, max/mean load, dead experts, router entropy, drop rate.
- `guard`: the warning for an MoE trained with every balancing mechanism off.
"""

from moekit.balance.bias import apply_bias_updates, moe_routers, sign_update
from moekit.balance.config import OBJECTIVE_KINDS, SCOPES, BalanceConfig, ObjectiveSpec
from moekit.balance.diagnostics import BalanceDiagnostics, diagnose, diagnose_stats
from moekit.balance.guard import BalancingDisabledWarning, balancing_mechanisms, warn_if_unbalanced
from moekit.balance.lm_loss import count_target_tokens, summed_cross_entropy
from moekit.balance.schedule import Schedule
from moekit.balance.stats import RoutingStats, SequenceStats, routing_probabilities, sequence_index
from moekit.balance.step import BatchTotals, ForwardOutput, MicroBatch, StepReport, accumulate_gradients

__all__ = [
    "OBJECTIVE_KINDS",
    "SCOPES",
    "BalanceConfig",
    "BalanceDiagnostics",
    "BalancingDisabledWarning",
    "BatchTotals",
    "ForwardOutput",
    "MicroBatch",
    "ObjectiveSpec",
    "RoutingStats",
    "Schedule",
    "SequenceStats",
    "StepReport",
    "accumulate_gradients",
    "apply_bias_updates",
    "balancing_mechanisms",
    "count_target_tokens",
    "diagnose",
    "diagnose_stats",
    "routing_probabilities",
    "sequence_index",
    "sign_update",
    "summed_cross_entropy",
    "moe_routers",
    "warn_if_unbalanced",
]
