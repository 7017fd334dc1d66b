"""Uncertainty and verdicts: bootstrap and t intervals, rank correlation, and the rule that turns
an interval and a threshold into "reproduced", "not reproduced at this scale" or "inconclusive".

Thin wrappers over scipy so that every experiment states its intervals the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moekit.errors import MoekitError

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced at this scale"
INCONCLUSIVE = "inconclusive"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided confidence interval at `level`."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def __post_init__(self) -> None:
        if not (self.low <= self.value <= self.high) and not np.isnan(self.value):
            raise MoekitError(f"Estimate: interval [{self.low}, {self.high}] does not hold {self.value}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _finite_vector(name: str, values: Any, minimum: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) < minimum:
        raise MoekitError(f"{name}: expected a list of at least {minimum} numbers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise MoekitError(f"{name}: expected finite numbers, got {array[~np.isfinite(array)][:3].tolist()}")
    return array


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get average ranks); NaN when either side is constant."""
    from scipy.stats import ConstantInputWarning, spearmanr

    a, b = _finite_vector("x", x, 3), _finite_vector("y", y, 3)
    if len(a) != len(b):
        raise MoekitError(f"spearman: x has {len(a)} values, y has {len(b)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return float(spearmanr(a, b).statistic)


def bootstrap(
    statistic: Callable[..., float],
    samples: Sequence[Sequence[float]],
    *,
    paired: bool = True,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap interval of `statistic(*samples)`; `paired` resamples rows jointly
    (as for a correlation between two columns of the same runs)."""
    from scipy.stats import bootstrap as scipy_bootstrap

    arrays = [_finite_vector(f"samples[{i}]", s, 2) for i, s in enumerate(samples)]
    result = scipy_bootstrap(
        arrays,
        statistic,
        paired=paired,
        vectorized=False,
        confidence_level=level,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    value = float(statistic(*arrays))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return Estimate(value, min(low, value), max(high, value), level)


def spearman_estimate(
    x: Sequence[float], y: Sequence[float], *, resamples: int = 2000, seed: int = 0
) -> Estimate:
    """Spearman's ρ with a paired bootstrap interval over the (x, y) pairs."""
    spearman(x, y)  # validates
    return bootstrap(lambda a, b: spearman(a, b), [x, y], resamples=resamples, seed=seed)


def mean_estimate(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean with a Student-t interval: the right interval for a handful of seeds, where a bootstrap
    of three values would be far too narrow."""
    from scipy.stats import t

    array = _finite_vector("values", values, 2)
    mean = float(array.mean())
    half = float(t.ppf(0.5 + level / 2, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array)))
    return Estimate(mean, mean - half, mean + half, level)


def verdict_at_least(estimate: Estimate, threshold: float) -> str:
    """Reproduced when the whole interval clears `threshold`, not reproduced when it lies wholly
    below, inconclusive when it straddles it."""
    if estimate.low >= threshold:
        return REPRODUCED
    if estimate.high < threshold:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """A claim made of several checks: reproduced only if every check is; not reproduced if any is not."""
    if not verdicts:
        raise MoekitError("combine_verdicts: no checks")
    for verdict in verdicts:
        if verdict not in VERDICTS:
            raise MoekitError(f"verdict: got {verdict!r}, expected one of {VERDICTS}")
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if any(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    return INCONCLUSIVE


def verdict_at_most(estimate: Estimate, threshold: float) -> str:
    """The mirror of `verdict_at_least`: reproduced when the whole interval stays at or below
    `threshold`, not reproduced when it lies wholly above, inconclusive when it straddles it."""
    if estimate.high <= threshold:
        return REPRODUCED
    if estimate.low > threshold:
        return NOT_REPRODUCED
    return INCONCLUSIVE
