"""Coefficient schedules: a loss weight or an update rate as a function of the optimizer step.

Papers switch their balancing terms on, off or down during training (DeepSeek-V3 sets the bias
update rate to 0 for the last tokens; UniMoE-Audio anneals its auxiliary weights), so every
coefficient in `moekit.balance` is a schedule, and a plain number means a constant one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moekit.errors import ConfigError, require_choice, require_int, require_known_fields, require_number

SCHEDULE_KINDS = ("constant", "linear")


@dataclass(frozen=True)
class Schedule:
    """`constant`: `start` at every step. `linear`: `start` at step 0, moving in a straight line
    to `end` at step `steps`, then `end` for ever after. Values are never negative."""

    kind: str = "constant"
    start: float = 0.0
    end: float | None = None
    steps: int = 0
    label: str = field(default="coefficient", compare=False, repr=False)  # the config field, for errors

    def __post_init__(self) -> None:
        require_choice(f"{self.label}.kind", self.kind, SCHEDULE_KINDS)
        _require_finite(f"{self.label}.start", self.start)
        if self.kind == "linear":
            if self.end is None:
                raise ConfigError(f"{self.label}.end", "missing; a linear schedule needs an end value")
            _require_finite(f"{self.label}.end", self.end)
            require_int(f"{self.label}.steps", self.steps, minimum=1)
        elif self.end is not None and self.end != self.start:
            raise ConfigError(f"{self.label}.end", "a constant schedule has no end value; use kind: linear")

    @staticmethod
    def constant(value: float, label: str = "coefficient") -> Schedule:
        return Schedule("constant", value, label=label)

    @staticmethod
    def linear(start: float, end: float, steps: int, label: str = "coefficient") -> Schedule:
        return Schedule("linear", start, end, steps, label=label)

    def value(self, step: int) -> float:
        """The coefficient at optimizer step `step` (0-based)."""
        require_int("step", step, minimum=0)
        if self.kind == "constant":
            return float(self.start)
        progress = min(step, self.steps) / self.steps
        return float(self.start + (self.end - self.start) * progress)

    @property
    def always_zero(self) -> bool:
        """True when no step has a non-zero value (the mechanism is switched off)."""
        return self.start == 0 and (self.kind == "constant" or self.end == 0)

    def to_dict(self) -> dict[str, Any] | float:
        if self.kind == "constant":
            return float(self.start)
        return {"kind": self.kind, "start": self.start, "end": self.end, "steps": self.steps}

    @classmethod
    def from_value(cls, data: Any, label: str = "coefficient") -> Schedule:
        """A number (constant), a mapping {kind, start, end, steps}, or a Schedule."""
        if isinstance(data, Schedule):
            return cls(data.kind, data.start, data.end, data.steps, label=label)
        if isinstance(data, dict):
            require_known_fields(label, data, ("kind", "start", "end", "steps"))
            if "start" not in data:
                raise ConfigError(f"{label}.start", "missing")
            return cls(
                data.get("kind", "constant"),
                data["start"],
                data.get("end"),
                data.get("steps", 0),
                label=label,
            )
        _require_finite(label, data)
        return cls("constant", data, label=label)


def _require_finite(name: str, value: Any) -> None:
    require_number(name, value, minimum=0.0)
    if not math.isfinite(value):
        raise ConfigError(name, f"got {value}, expected a finite number >= 0")
