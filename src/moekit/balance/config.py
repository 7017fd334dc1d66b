"""Which balancing objectives a run trains with, their coefficient schedules and statistics scopes.

An objective is a formula (`kind`) applied to statistics gathered over a `scope`:

- `load_balance`: E·Σ_i f_i P_i with top-k counts. At `micro_batch` scope it is the Switch/GShard
  loss as most trainers implement it (per micro-batch, then the mean over every micro-batch of the
  global batch, across accumulation steps and ranks); at `sequence` scope it is DeepSeek-V3's
  sequence-wise auxiliary loss (per document, mean over the global batch's documents); at `global`
  scope it is the global-batch LBL of "Demons in the Detail" (#53): f from the whole global batch.
- `z_loss`: ST-MoE router z-loss, a token mean.
- `entropy`: the mean routing entropy of dynamic routing (#9), a token mean.

Token means are taken over the micro-batch (then averaged over micro-batches), per sequence (then
averaged over sequences), or over the global batch's real tokens. Only the micro-batch scope depends
on how the global batch is cut into micro-batches; that is its definition, not a bug, and it is
still independent of how those micro-batches are spread over accumulation steps and ranks.

Several objectives may be combined (DeepSeek-V3: the bias plus a tiny sequence-wise loss); each
(kind, scope) pair at most once. Each layer's objective is added, so the total sums over MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moekit.balance.schedule import Schedule
from moekit.errors import ConfigError, require_choice, require_known_fields

OBJECTIVE_KINDS = ("load_balance", "z_loss", "entropy")
SCOPES = ("micro_batch", "sequence", "global")


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective: its formula, the scope of its statistics, and its coefficient schedule (α)."""

    kind: str
    scope: str = "global"
    coefficient: Schedule = field(default_factory=lambda: Schedule.constant(0.0))

    def __post_init__(self) -> None:
        require_choice("objective.kind", self.kind, OBJECTIVE_KINDS)
        require_choice("objective.scope", self.scope, SCOPES)
        if not isinstance(self.coefficient, Schedule):
            raise ConfigError(
                "objective.coefficient", f"expected a Schedule, got {type(self.coefficient).__name__}"
            )

    @property
    def name(self) -> str:
        """`kind/scope`, the key of this objective in reports and logs."""
        return f"{self.kind}/{self.scope}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scope": self.scope, "coefficient": self.coefficient.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, field_prefix: str) -> ObjectiveSpec:
        if not isinstance(data, dict):
            raise ConfigError(field_prefix, f"expected a mapping with kind, scope, coefficient; got {data!r}")
        require_known_fields(field_prefix, data, ("kind", "scope", "coefficient"))
        if "kind" not in data:
            raise ConfigError(
                f"{field_prefix}.kind", f"missing; expected one of {', '.join(OBJECTIVE_KINDS)}"
            )
        if "coefficient" not in data:
            raise ConfigError(f"{field_prefix}.coefficient", "missing")
        require_choice(f"{field_prefix}.kind", data["kind"], OBJECTIVE_KINDS)
        scope = data.get("scope", "global")
        require_choice(f"{field_prefix}.scope", scope, SCOPES)
        coefficient = Schedule.from_value(data["coefficient"], f"{field_prefix}.coefficient")
        return cls(data["kind"], scope, coefficient)


@dataclass(frozen=True)
class BalanceConfig:
    """The balancing setup of a training run.

    - `objectives`: auxiliary objectives added to the LM loss (see the module docstring).
    - `bias_update_rate`: γ of DeepSeek-V3's aux-loss-free balancing, applied to routers that have
      a selection bias (`RouterSpec.selection_bias`); 0 switches it off.
    """

    objectives: tuple[ObjectiveSpec, ...] = ()
    bias_update_rate: Schedule = field(default_factory=lambda: Schedule.constant(0.0, "bias_update_rate"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "objectives", tuple(self.objectives))
        seen: set[str] = set()
        for i, spec in enumerate(self.objectives):
            if not isinstance(spec, ObjectiveSpec):
                raise ConfigError(
                    f"balance.objectives[{i}]", f"expected an ObjectiveSpec, got {type(spec).__name__}"
                )
            if spec.name in seen:
                raise ConfigError(f"balance.objectives[{i}]", f"{spec.name} is listed twice")
            seen.add(spec.name)
        if not isinstance(self.bias_update_rate, Schedule):
            raise ConfigError("balance.bias_update_rate", "expected a Schedule")

    def coefficients(self, step: int) -> dict[str, float]:
        """Each objective's coefficient at optimizer step `step`, by `kind/scope`."""
        return {spec.name: spec.coefficient.value(step) for spec in self.objectives}

    def to_dict(self) -> dict[str, Any]:
        return {
            "objectives": [spec.to_dict() for spec in self.objectives],
            "bias_update_rate": self.bias_update_rate.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, field_prefix: str = "balance") -> BalanceConfig:
        """From a mapping such as::

        objectives:
          - {kind: load_balance, scope: global, coefficient: 0.01}
          - {kind: z_loss, scope: global, coefficient: {kind: linear, start: 0.001, end: 0, steps: 1000}}
        bias_update_rate: 0.001
        """
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(field_prefix, f"expected a mapping, got {type(data).__name__}")
        require_known_fields(field_prefix, data, ("objectives", "bias_update_rate"))
        raw_objectives = data.get("objectives") or []
        if not isinstance(raw_objectives, list | tuple):
            raise ConfigError(
                f"{field_prefix}.objectives", f"expected a list, got {type(raw_objectives).__name__}"
            )
        objectives = []
        seen: dict[str, int] = {}
        for i, item in enumerate(raw_objectives):
            spec = ObjectiveSpec.from_dict(item, f"{field_prefix}.objectives[{i}]")
            if spec.name in seen:
                raise ConfigError(
                    f"{field_prefix}.objectives[{i}]", f"{spec.name} is already objectives[{seen[spec.name]}]"
                )
            seen[spec.name] = i
            objectives.append(spec)
        rate = Schedule.from_value(data.get("bias_update_rate", 0.0), f"{field_prefix}.bias_update_rate")
        return cls(tuple(objectives), rate)
