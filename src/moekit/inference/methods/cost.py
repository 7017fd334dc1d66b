"""The compute a test-time method spends beyond plain decoding, counted rather than timed."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class MethodCost:
    """Model forward passes (a prefill or a decoding step each count one), backward passes, and
    routed expert assignments (token-expert pairs computed), as counted while the method ran."""

    forward_passes: int = 0
    backward_passes: int = 0
    assignments: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
