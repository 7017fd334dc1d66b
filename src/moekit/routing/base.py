"""What every spec-configured research router shares: its spec, its options, its expert counts."""

from __future__ import annotations

from typing import Any

from torch import nn

from moekit.routing.spec import RouterSpec


class SpecRouter(nn.Module):
    """A router configured by a `RouterSpec` and its own options dataclass.

    Subclasses validate the pair in `check_config` (called here, before any parameter exists),
    and implement `forward(x, token_mask=None, previous=None, ...) -> Routing`. Routers with
    zero-compute experts beyond the spec's count add them in `extra_experts`.
    """

    def __init__(self, spec: RouterSpec, options: Any):
        super().__init__()
        self.check_config(spec, options)
        self.spec = spec
        self.options = options

    @staticmethod
    def check_config(spec: RouterSpec, options: Any) -> None:
        """Raise ConfigError naming the field if the spec or options do not suit this router."""

    @property
    def extra_experts(self) -> int:
        return 0

    @property
    def num_experts(self) -> int:
        """Experts in the routing record, zero-compute ones included."""
        return self.spec.num_experts + self.extra_experts

    @property
    def num_compute_experts(self) -> int:
        return self.spec.num_experts
