"""Building MoE models from dense ones (upcycling), with a receipt for every build.

Names are imported on first use, so that the CLI's parser does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "UpcycleRecipe": "moekit.construct.hf",
    "upcycle_hf": "moekit.construct.hf",
    "upcycle": "moekit.construct.api",
    "upcycle_ffn": "moekit.construct.ffn",
    "router_init": "moekit.construct.router_init",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moekit.construct' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
