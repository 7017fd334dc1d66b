"""The corpus domains. Their order fixes the label index stored in every batch's `domains` tensor.

Labels travel with the data for evaluation and routing analysis only; a model never receives them.
"""

from __future__ import annotations

from types import MappingProxyType

from moekit.errors import ConfigError

DOMAINS: tuple[str, ...] = ("code", "english", "multilingual", "math", "structured")

DOMAIN_DESCRIPTIONS = MappingProxyType(
    {
        "code": "Python source code (CPython standard library)",
        "english": "English literature (Shakespeare's plays and poems)",
        "multilingual": "natural languages other than English (dialogues and translated messages)",
        "math": "generated arithmetic and algebra problems with exact answers",
        "structured": "JSON, CSV, log files and tab-separated tables",
    }
)


def check_domain(name: str, known: tuple[str, ...] = DOMAINS, field: str = "domain") -> str:
    """Return `name` if it is one of `known`, else a ConfigError naming the choices."""
    if name not in known:
        raise ConfigError(field, f"got {name!r}, expected one of {', '.join(known)}")
    return name
