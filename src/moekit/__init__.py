"""moekit: a PyTorch toolkit for Mixture-of-Experts models.

Top-level names are imported on first use, so that `moekit.cli` can tune the CPU runtime before
torch is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moekit.lazy_exports import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "MoE": "moekit.layer",
    "MoEConfig": "moekit.layer",
    "Assignments": "moekit.routing.record",
    "Routing": "moekit.routing.record",
    "RouterSpec": "moekit.routing.spec",
    "preset": "moekit.routing.spec",
    "PRESET_NAMES": "moekit.routing.spec",
    "from_hf": "moekit.interop.hf",
    "to_hf": "moekit.interop.hf",
    "patch": "moekit.interop.patch",
    "generate": "moekit.inference.generate",
    "stream": "moekit.inference.generate",
    "OffloadConfig": "moekit.inference.offload",
    "RoutingOverride": "moekit.routing.override",
    "Overrides": "moekit.routing.override",
    "RoutingCapture": "moekit.routing.override",
    "override_routing": "moekit.routing.override",
}

__all__ = [
    "MoE",
    "MoEConfig",
    "Assignments",
    "Routing",
    "RouterSpec",
    "preset",
    "PRESET_NAMES",
    "from_hf",
    "to_hf",
    "patch",
    "generate",
    "stream",
    "OffloadConfig",
    "RoutingOverride",
    "Overrides",
    "RoutingCapture",
    "override_routing",
]

if TYPE_CHECKING:
    from moekit.inference.generate import generate, stream
    from moekit.inference.offload import OffloadConfig
    from moekit.interop.hf import from_hf, to_hf
    from moekit.interop.patch import patch
    from moekit.layer import MoE, MoEConfig
    from moekit.routing.override import Overrides, RoutingCapture, RoutingOverride, override_routing
    from moekit.routing.record import Assignments, Routing
    from moekit.routing.spec import PRESET_NAMES, RouterSpec, preset

__getattr__ = lazy_getattr(__name__, _EXPORTS)
