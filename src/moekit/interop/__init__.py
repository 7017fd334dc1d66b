"""HF transformers interop: import MoE checkpoints into moekit's family model and export them back
(`from_hf`, `to_hf`), and run a live transformers model's MoE blocks on moekit layers (`patch`).

Names are imported on first use, so that `moekit convert`'s parser does not load torch.
"""

from __future__ import annotations

from moekit.lazy_exports import lazy_getattr

_EXPORTS = {
    "from_hf": "moekit.interop.hf",
    "to_hf": "moekit.interop.hf",
    "save_family": "moekit.interop.hf",
    "load_family": "moekit.interop.hf",
    "patch": "moekit.interop.patch",
    "PatchHandle": "moekit.interop.patch",
    "FamilyModel": "moekit.interop.model",
    "FamilyConfig": "moekit.interop.model",
    "SUPPORTED": "moekit.interop.families",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
