"""A training stream with a chosen mixture over the corpus's domains: each row of a batch is drawn
from one domain, in the proportions of the mixture weights.

RegMix's proxies (#32) and an imbalanced corpus (UniMoE-Audio, #2) both need the share of each
domain in the training tokens set by hand rather than by the corpus's sizes. Rows are assigned by
systematic sampling (one seeded offset per batch, then evenly spaced points on the cumulative
weights), so a batch of B rows holds each domain's share of B rounded down or up, never a lucky
draw of whole batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from moekit.data.batch import Batch
from moekit.data.lmdata import LanguageModelData
from moekit.data.loader import TrainBatches, _unit_hash, assemble_batch, next_row
from moekit.errors import ConfigError


def check_weights(weights: Mapping[str, float], domains: tuple[str, ...]) -> dict[str, float]:
    """Weights over known domains, non-negative, summing to 1 (to 1e-6); zero weights dropped."""
    unknown = [d for d in weights if d not in domains]
    if unknown:
        raise ConfigError("mixture", f"got domain {unknown[0]!r}, expected domains of {', '.join(domains)}")
    values = np.array(list(weights.values()), dtype=np.float64)
    if not np.isfinite(values).all() or (values < 0).any() or abs(values.sum() - 1) > 1e-6:
        raise ConfigError("mixture", f"got weights {values.round(4).tolist()}, expected >= 0 summing to 1")
    return {d: float(w) for d, w in weights.items() if w > 0}


class MixtureBatches(TrainBatches):
    """`TrainBatches` with one group of lanes per domain (as for single-domain batches) whose rows
    are dealt to the domains by `weights` instead of a whole batch to one domain."""

    def __init__(self, base: TrainBatches, labels: Mapping[int, str], weights: Mapping[str, float]):
        config = replace(base.config, single_domain=True)
        super().__init__(base.segments, labels, config, pad_id=base.pad_id, fingerprint=base.fingerprint)
        self.names = list(self.groups)
        shares = np.array([weights[name] for name in self.names], dtype=np.float64)
        self._cumulative = np.cumsum(shares / shares.sum())

    def row_domains(self, number: int) -> list[str]:
        """The domain of each row of batch `number` (systematic sampling with a seeded offset)."""
        size = self.config.batch_size
        offset = _unit_hash(f"mixture/{self.config.seed}/{number}") / 2.0**64
        points = (np.arange(size) + offset) / size
        picks = np.minimum(np.searchsorted(self._cumulative, points, side="right"), len(self.names) - 1)
        return [self.names[i] for i in picks]

    def __next__(self) -> Batch:
        size = self.config.batch_size
        rows = []
        for row, name in enumerate(self.row_domains(self.batches)):
            lanes = self.groups[name]
            rows.append(
                next_row(
                    lanes[(self.batches * size + row) % len(lanes)], self.config.seq_len, self.config.layout
                )
            )
        self.batches += 1
        return assemble_batch(rows, self.segments, self.config.seq_len, self.pad_id)


class MixtureData(LanguageModelData):
    """`LanguageModelData` whose training stream follows a mixture over the domains."""

    def __init__(self, base: LanguageModelData, weights: Mapping[str, float]):
        super().__init__(base.splits, base.tokenizer)
        self._segments = base._segments  # share the encoded splits
        self.weights = check_weights(weights, base.domains)

    def fingerprint(self, config) -> str:
        own = super().fingerprint(config)
        described = ",".join(f"{d}={w:.6f}" for d, w in sorted(self.weights.items()))
        return hashlib.sha256(f"{own}/mixture/{described}".encode()).hexdigest()

    def train_batches(self, batch_size: int, seq_len: int, **options) -> TrainBatches:
        base = super().train_batches(batch_size, seq_len, **options)
        labels = {self.domains.index(d): d for d in self.weights}
        return MixtureBatches(base, labels, self.weights)
