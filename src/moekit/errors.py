"""Errors that tell the user which field or file was wrong and what was expected."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class MoekitError(Exception):
    """Base of every error moekit raises on purpose; the CLI prints these without a traceback."""


class ConfigError(MoekitError, ValueError):
    """A configuration field has a value moekit cannot use."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")

    def renamed(self, field: str) -> ConfigError:
        """The same error under the name the user wrote (an option such as `--top-k`, a recipe's
        field) instead of the internal field that raised it."""
        return ConfigError(field, self.detail)


def require_choice(field: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ConfigError(field, f"got {value!r}, expected one of {shown}")


def require_int(field: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"got {value!r}, expected an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(field, f"got {value}, expected an integer >= {minimum}")


def require_number(field: str, value: Any, minimum: float | None = None, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, f"got {value!r}, expected a number")
    if not math.isfinite(value):
        raise ConfigError(field, f"got {value!r}, expected a finite number")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        relation = ">" if strict else ">="
        raise ConfigError(field, f"got {value}, expected a number {relation} {minimum}")


def require_known_fields(field_prefix: str, data: Iterable[Any], known: Iterable[str]) -> None:
    """Refuse a key of the mapping `data` outside `known`, naming the first one as `prefix.key` (the
    bare key where `field_prefix` is empty) and listing the known fields."""
    known = sorted(known)
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        field = f"{field_prefix}.{unknown[0]}" if field_prefix else str(unknown[0])
        raise ConfigError(field, f"unknown field; expected one of {', '.join(known)}")
