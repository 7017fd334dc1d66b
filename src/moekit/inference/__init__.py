"""Running MoE models: KV-cached generation (`generate`, `stream`), its cache, experts streamed
from disk (`OffloadConfig`, `attach`), and the CLI.

Imported on use: `moekit.interop` and `moekit.models` import the cache from here, so this package
must not import them back at import time.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "generate": "moekit.inference.generate",
    "stream": "moekit.inference.generate",
    "GenerationConfig": "moekit.inference.generate",
    "KVCache": "moekit.inference.kv_cache",
    "LayerCache": "moekit.inference.kv_cache",
    "OffloadConfig": "moekit.inference.offload",
    "attach": "moekit.inference.offload",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moekit.inference' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
