"""RegMix (#32, Liu et al. 2024) proxy regression: from a proxy run's mixture weights over the
domains to its validation loss on a target domain, judged by the rank correlation on held-out runs.

Reads the proxy results the paper's authors published (shipped with moekit under
`experiments/data/regmix/`, MIT licence): 512 training runs and 256 held-out runs of 1M-parameter
models, the same 256 held-out mixtures at 60M parameters, and 64 runs at 1B parameters.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from moekit.errors import MoekitError

MIXTURE_PREFIX = "train_the_pile_"
LOSS_PREFIX, LOSS_SUFFIX = "metric/the_pile_", "_val_loss"
PILE_CC = "pile_cc"
SCALES = ("1m", "60m", "1B")
REGRESSORS = ("linear", "gbt")


@dataclass(frozen=True)
class ProxyRuns:
    """Proxy runs matched by index: `weights[i]` is run i's mixture over `domains`, `losses[i]` its
    validation loss on each of `targets`."""

    index: np.ndarray  # [n] int
    domains: tuple[str, ...]
    weights: np.ndarray  # [n, domains] float64, rows sum to 1
    targets: tuple[str, ...]
    losses: np.ndarray  # [n, targets] float64

    def loss(self, target: str) -> np.ndarray:
        if target not in self.targets:
            raise MoekitError(f"target: got {target!r}, expected one of {', '.join(self.targets)}")
        return self.losses[:, self.targets.index(target)]


def _read_table(
    path: Path | object, prefix: str, suffix: str = ""
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(index column, column names without prefix/suffix, values) of one CSV; one clear line on bad input."""
    name = getattr(path, "name", str(path))
    try:
        text = path.read_text()  # type: ignore[union-attr]
    except OSError as exc:
        raise MoekitError(f"{name}: cannot read ({exc.strerror or exc})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or not rows[0] or rows[0][0] != "index":
        raise MoekitError(f"{name}: expected a CSV whose first column is 'index'")
    header = rows[0][1:]
    bad = [h for h in header if not (h.startswith(prefix) and h.endswith(suffix))]
    if bad or not header:
        raise MoekitError(f"{name}: expected columns named {prefix}<domain>{suffix}, got {bad[:2] or 'none'}")
    columns = [h[len(prefix) : len(h) - len(suffix)] for h in header]
    body = [r for r in rows[1:] if r]
    values = np.empty((len(body), len(header)), dtype=np.float64)
    index = np.empty(len(body), dtype=np.int64)
    for i, row in enumerate(body):
        if len(row) != len(header) + 1:
            raise MoekitError(f"{name}: row {i + 2} has {len(row)} fields, expected {len(header) + 1}")
        try:
            index[i] = int(row[0])
            values[i] = [float(v) for v in row[1:]]
        except ValueError:
            raise MoekitError(f"{name}: row {i + 2} holds a value that is not a number") from None
    if not np.isfinite(values).all():
        raise MoekitError(f"{name}: holds values that are not finite numbers")
    if len(set(index.tolist())) != len(index):
        raise MoekitError(f"{name}: the 'index' column repeats a run")
    return index, columns, values


def read_runs(mixture_path: Path | object, loss_path: Path | object) -> ProxyRuns:
    """Join a mixture CSV and a loss CSV on `index` (the paper's file layout)."""
    mix_index, domains, weights = _read_table(mixture_path, MIXTURE_PREFIX)
    loss_index, targets, losses = _read_table(loss_path, LOSS_PREFIX, LOSS_SUFFIX)
    if set(mix_index.tolist()) != set(loss_index.tolist()):
        missing = sorted(set(mix_index.tolist()) ^ set(loss_index.tolist()))[:3]
        raise MoekitError(
            f"{getattr(loss_path, 'name', loss_path)}: runs do not match the mixture file by index "
            f"(e.g. {missing})"
        )
    sums = weights.sum(axis=1)
    if (weights < 0).any() or np.abs(sums - 1).max() > 0.02:
        row = int(np.argmax(np.abs(sums - 1)))
        raise MoekitError(
            f"{getattr(mixture_path, 'name', mixture_path)}: mixture weights should be >= 0 and sum to 1, "
            f"run {int(mix_index[row])} sums to {sums[row]:.3f}"
        )
    order = np.argsort(mix_index)
    loss_order = np.argsort(loss_index)
    return ProxyRuns(mix_index[order], tuple(domains), weights[order], tuple(targets), losses[loss_order])


def published_runs(split: str, scale: str) -> ProxyRuns:
    """The paper's own proxy runs: split 'train' (scale '1m' only) or 'test' (scales 1m, 60m, 1B)."""
    if split not in ("train", "test") or scale not in SCALES or (split == "train" and scale != "1m"):
        raise MoekitError(f"published runs: no {split} runs at scale {scale!r}")
    folder = files("moekit.experiments") / "data" / "regmix"
    return read_runs(folder / f"{split}_mixture_{scale}.csv", folder / f"{split}_pile_loss_{scale}.csv")


def fit_regressor(
    kind: str, weights: np.ndarray, losses: np.ndarray, seed: int = 0
) -> Callable[[np.ndarray], np.ndarray]:
    """Mixture weights -> target loss. 'linear': least squares (the paper's linear model). 'gbt':
    gradient-boosted trees with LightGBM's defaults (31 leaves, 20 samples per leaf) and the paper's
    notebook settings (learning rate 0.01, up to 1000 rounds, early stopping on a held-back tenth)."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import LinearRegression
    from threadpoolctl import threadpool_limits

    if kind not in REGRESSORS:
        raise MoekitError(f"regressor: got {kind!r}, expected one of {', '.join(REGRESSORS)}")
    if len(weights) != len(losses) or len(weights) < 8:
        raise MoekitError(
            f"regressor: need at least 8 runs with one loss each, got {len(weights)} and {len(losses)}"
        )
    if kind == "linear":
        model = LinearRegression()
    else:
        model = HistGradientBoostingRegressor(
            learning_rate=0.01,
            max_iter=1000,
            max_leaf_nodes=31,
            min_samples_leaf=20,
            early_stopping=True,
            validation_fraction=0.1,
            n_iter_no_change=50,
            random_state=seed,
        )
    # A few hundred rows: one thread. OpenMP's spinning threads cost more than they save on so little
    # work, and much more on a machine whose cores are busy.
    with threadpool_limits(1):
        model.fit(np.asarray(weights, dtype=np.float64), np.asarray(losses, dtype=np.float64))

    def predict(x: np.ndarray) -> np.ndarray:
        with threadpool_limits(1):
            return np.asarray(model.predict(np.asarray(x, dtype=np.float64)), dtype=np.float64)

    return predict


def align_domains(runs: ProxyRuns, domains: tuple[str, ...]) -> np.ndarray:
    """`runs.weights` with its columns in the order of `domains` (the regression's feature order)."""
    if set(runs.domains) != set(domains):
        raise MoekitError(f"mixture domains differ: {sorted(set(runs.domains) ^ set(domains))[:3]}")
    return runs.weights[:, [runs.domains.index(d) for d in domains]]
