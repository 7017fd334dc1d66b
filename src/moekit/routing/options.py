"""Reading a router's or expert type's options, and checking the spec axes it does not use.

Each router kind and expert kind keeps its options in a frozen dataclass that validates itself and
names the offending field (`moe.router_options.p`, `moe.experts_options.rank`). Kinds that read only
some of the `RouterSpec` axes reject the others when set away from their defaults, so a setting is
never silently ignored.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, TypeVar

from moekit.errors import ConfigError
from moekit.routing.spec import RouterSpec

ROUTER_OPTIONS = "moe.router_options"
EXPERTS_OPTIONS = "moe.experts_options"

T = TypeVar("T")


def options_from_dict(cls: type[T], data: Any, field_prefix: str) -> T:
    """`cls(**data)` after checking that `data` is a mapping holding known and required keys only."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(field_prefix, f"expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        expected = ", ".join(sorted(known)) if known else "no options"
        raise ConfigError(f"{field_prefix}.{unknown[0]}", f"unknown option; expected {expected}")
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in data:
            raise ConfigError(f"{field_prefix}.{f.name}", "missing (required)")
    return cls(**data)


def require_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(field, f"got {value!r}, expected true or false")


def require_fraction(field: str, value: Any) -> None:
    """A number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(field, f"got {value!r}, expected a number in (0, 1]")


def require_optional_int(field: str, value: Any, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(field, f"got {value!r}, expected null or an integer >= {minimum}")


def require_spec_defaults(spec: RouterSpec, kind: str, used: set[str]) -> None:
    """Reject every `RouterSpec` axis outside `used` that is set away from its default.

    `num_experts` and `top_k` are always allowed (every kind documents what `top_k` means for it),
    and so are the jitter axes and `weight_on`, which the MoE layer applies around any router.
    """
    allowed = used | {"num_experts", "top_k", "jitter_eps", "jitter_target", "weight_on"}
    for f in fields(RouterSpec):
        if f.name in allowed or f.default is MISSING:
            continue
        value = getattr(spec, f.name)
        if value != f.default:
            raise ConfigError(
                f"moe.router.{f.name}",
                f"got {value!r}, but the {kind} router does not use this axis; "
                f"expected the default {f.default!r}",
            )


def require_spec_value(spec: RouterSpec, kind: str, name: str, allowed: tuple[Any, ...]) -> None:
    value = getattr(spec, name)
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"moe.router.{name}", f"got {value!r}; the {kind} router supports {shown}")


# The spec axes a router honours when it scores with softmax(W x), selects a set of experts per
# token and then weights (renorm, scaling) and caps (capacity) them as token-choice routing does.
SOFTMAX_SET_SPEC_AXES = frozenset(
    {
        "score_fn",
        "renorm",
        "renorm_p",
        "renorm_eps",
        "scaling",
        "router_bias",
        "capacity_factor",
        "drop_policy",
    }
)


def require_softmax_set_spec(spec: RouterSpec, kind: str) -> None:
    """For routers that pick a softmax-scored set per token (top-p, null experts, dynamic capacity)."""
    require_spec_defaults(spec, kind, set(SOFTMAX_SET_SPEC_AXES))
    require_spec_value(spec, kind, "score_fn", ("softmax",))
