"""Reading config files: YAML in, `--set a.b=value` overrides, every error naming its field."""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from moekit.errors import ConfigError, MoekitError, require_known_fields


def load_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MoekitError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MoekitError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MoekitError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` strings (value parsed as YAML: numbers, booleans, null, lists)."""
    out = deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", f"got {item!r}, expected key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError("--set", f"got {item!r}, expected key.path=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: depth + 1]), f"is a value, cannot set {key}")
            node = child
        node[parts[-1]] = value
    return out


def dataclass_from_dict(cls: type, data: Any, field_prefix: str) -> Any:
    """Build a flat dataclass from a mapping: unknown keys, missing keys and wrong types name the field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(field_prefix, f"expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    require_known_fields(field_prefix, data, known)
    hints = get_type_hints(cls)
    values = {}
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{field_prefix}.{name}", "missing")
            continue
        values[name] = _coerce(data[name], hints[name], f"{field_prefix}.{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, field: str) -> Any:
    """Accept ints for float fields; reject strings where numbers are expected, and similar."""
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(field, "must not be null")
    if is_dataclass(hint):
        return dataclass_from_dict(hint, value, field)
    if hint is float or text in ("float", "float | None"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field, f"got {value!r}, expected a number")
        if not math.isfinite(value):
            raise ConfigError(field, f"got {value!r}, expected a finite number")
        return float(value)
    if hint is int or text in ("int", "int | None"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(field, f"got {value!r}, expected an integer")
        return value
    if hint is bool or text in ("bool", "bool | None"):
        if not isinstance(value, bool):
            raise ConfigError(field, f"got {value!r}, expected true or false")
        return value
    if hint is str or text in ("str", "str | None"):
        if not isinstance(value, str):
            raise ConfigError(field, f"got {value!r}, expected a string")
        return value
    return value
