"""Online dynamic pruning (MC-MoE #38, ODP): skip expert work where it matters little.

Two rules, both on the routing override (`moekit.routing.override`), each off at 0:
- weight ratio: where a token's second expert has weight below `threshold` × its first's
  (w₂ < β·w₁), the token is computed with its first expert only (`min_weight_ratio`);
- token importance: in each prefilled sequence the `skip_fraction` least important tokens (τ_l)
  keep only their `skipped_top_k` best experts (0: none, the paper's rule) and the
  `protect_fraction` most important (τ_h) are spared the weight-ratio rule
  (`moekit.routing.importance`: MC-MoE's attention-received × L1-norm score, or with
  `importance="position"` the score its released code computes).
MC-MoE's paper protects and skips 10% each; its released code ships τ_l = 0 and τ_h = 0.02.
"""

from __future__ import annotations

from collections.abc import Sequence

from moekit.errors import ConfigError
from moekit.routing.override import Overrides, RoutingOverride


def odp_overrides(
    threshold: float,
    layers: Sequence[int | str] | None = None,
    *,
    skip_fraction: float = 0.0,
    protect_fraction: float = 0.0,
    skipped_top_k: int = 0,
    importance: str = "attention",
    spare_last_token: bool = True,
) -> Overrides:
    """Overrides pruning in `layers` (None = every MoE layer) at weight ratio `threshold` and, with
    a non-zero `skip_fraction` or `protect_fraction`, by token importance (see the module). A bad
    value raises `ConfigError` naming this function's parameter."""
    try:
        override = RoutingOverride(
            min_weight_ratio=threshold,
            skip_fraction=skip_fraction or None,
            protect_fraction=protect_fraction or None,
            skipped_top_k=skipped_top_k,
            importance=importance,
            spare_last_token=spare_last_token,
        )
    except ConfigError as exc:
        name = exc.field.removeprefix("override.")
        raise exc.renamed("threshold" if name == "min_weight_ratio" else name) from None
    if layers is None:
        return Overrides(default=override)
    return Overrides(layers={key: override for key in layers})
