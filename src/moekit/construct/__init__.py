"""Building MoE models from dense ones (upcycling), with a receipt for every build.

Names are imported on first use, so that the CLI's parser does not load torch.
"""

from __future__ import annotations

from moekit.lazy_exports import lazy_getattr

_EXPORTS = {
    "UpcycleRecipe": "moekit.construct.hf",
    "upcycle_hf": "moekit.construct.hf",
    "upcycle": "moekit.construct.api",
    "upcycle_ffn": "moekit.construct.ffn",
    "router_init": "moekit.construct.router_init",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
