"""Domain experts into one model: branch a dense seed per domain, then mix the branches into an
MoE (Branch-Train-MiX, FlexOlmo routing, opt-out/opt-in), ensemble them (HDEE) or merge them, and
compare all of it per domain from one recipe (`moekit build`).

Names are imported on first use, so that the CLI's parser does not load torch.
"""

from __future__ import annotations

from moekit.lazy_exports import lazy_getattr

_EXPORTS = {
    "branch": "moekit.domains.branch",
    "mix": "moekit.domains.mix",
    "mix_lm": "moekit.domains.mix",
    "MixOptions": "moekit.domains.mix",
    "remove_expert": "moekit.domains.experts",
    "add_expert": "moekit.domains.experts",
    "edit_experts": "moekit.domains.experts",
    "flexolmo_router_logits": "moekit.domains.flexolmo",
    "hdee_posterior_log_weights": "moekit.domains.ensemble",
    "hdee_ensemble_nll": "moekit.domains.ensemble",
    "BuildRecipe": "moekit.domains.recipe",
    "build": "moekit.domains.build",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
