"""Online dynamic pruning (MC-MoE #38, ODP): skip a token's second expert when it matters little.

Where the second expert's routing weight is below `threshold` × the first's (w₂ < β·w₁), the token
is computed with its first expert only, saving that expert's compute. Built on the routing
override's `min_weight_ratio`; threshold 0 prunes nothing. The paper's other half (tokens of
lowest attention-based importance skip all experts) is not done here.
"""

from __future__ import annotations

from collections.abc import Sequence

from moekit.errors import ConfigError
from moekit.routing.override import Overrides, RoutingOverride


def odp_overrides(threshold: float, layers: Sequence[int | str] | None = None) -> Overrides:
    """Overrides pruning in `layers` (None = every MoE layer) at weight ratio `threshold`."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ConfigError("threshold", f"got {threshold!r}, expected a number in [0, 1]")
    override = RoutingOverride(min_weight_ratio=float(threshold))
    if layers is None:
        return Overrides(default=override)
    return Overrides(layers={key: override for key in layers})
