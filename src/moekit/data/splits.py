"""Train/validation/test splits by document, per domain, and the leave-one-domain-out option.

Within each domain the documents are ordered by a hash of their id (salted by `seed`) and the
first ones go to validation and test by the requested fractions; each split then gets at least one
document when the domain has three or more. A split therefore never shares a document with
another, is the same on every run and machine, and is balanced per domain. With `holdout` set,
that domain is left out of training entirely: its documents remain available for evaluation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

from moekit.data.corpus import Corpus, Document
from moekit.data.domains import check_domain
from moekit.data.mathgen import MathProblem, problem_from_text
from moekit.errors import ConfigError, require_choice

SPLITS: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.90, 0.05, 0.05)


def split_counts(count: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, validation, test) sizes for a domain of `count` documents."""
    _, validation_fraction, test_fraction = fractions

    def share(fraction: float) -> int:
        if fraction <= 0:
            return 0
        return max(1, round(count * fraction)) if count >= 3 else 0

    validation, test = share(validation_fraction), share(test_fraction)
    if count >= 3 and validation + test >= count:
        validation, test = min(validation, 1), min(test, 1)
    return count - validation - test, validation, test


def split_domain(
    documents: tuple[Document, ...], fractions: tuple[float, float, float], seed: int = 0
) -> dict[str, tuple[Document, ...]]:
    ordered = sorted(documents, key=lambda d: hashlib.sha256(f"split:{seed}:{d.id}".encode()).digest())
    _, validation, test = split_counts(len(ordered), fractions)
    parts = {
        "validation": ordered[:validation],
        "test": ordered[validation : validation + test],
        "train": ordered[validation + test :],
    }
    return {name: tuple(sorted(parts[name], key=lambda d: d.id)) for name in SPLITS}


@dataclass(frozen=True)
class CorpusSplits:
    """A corpus cut into splits. `documents(split, domain)` is the one accessor."""

    corpus: Corpus
    fractions: tuple[float, float, float]
    seed: int
    holdout: str | None
    parts: Mapping[tuple[str, str], tuple[Document, ...]]

    @property
    def domains(self) -> tuple[str, ...]:
        """All domains, in label order (including a held-out one)."""
        return self.corpus.domains

    @property
    def training_domains(self) -> tuple[str, ...]:
        return tuple(d for d in self.domains if d != self.holdout)

    def documents(self, split: str, domain: str | None = None) -> tuple[Document, ...]:
        """Documents of `split` in `domain`, or, with no domain, of every domain that split uses:
        all domains for validation and test, all but the held-out one for train."""
        require_choice("split", split, SPLITS)
        if domain is not None:
            return self.parts[(check_domain(domain, self.domains), split)]
        domains = self.training_domains if split == "train" else self.domains
        return tuple(doc for d in domains for doc in self.parts[(d, split)])

    def math_problems(self, split: str = "test") -> list[MathProblem]:
        """The math domain's problems in `split`, with exact answers, for test-time methods."""
        if "math" not in self.domains:
            raise ConfigError("domain", f"corpus {self.corpus.name!r} has no math domain")
        return [
            problem_from_text(d.text, d.answer or "", kind=d.id.rsplit("/", 1)[-1].split("-", 1)[0])
            for d in self.documents(split, "math")
        ]

    def describe(self) -> dict[str, dict[str, int]]:
        """Document counts per domain and split (for logs and reports)."""
        return {d: {s: len(self.parts[(d, s)]) for s in SPLITS} for d in self.domains}


def split_corpus(
    corpus: Corpus,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    *,
    holdout: str | None = None,
    seed: int = 0,
) -> CorpusSplits:
    """Cut every domain of `corpus` into train/validation/test; `holdout` names a domain to keep
    out of training (leave-one-domain-out)."""
    fractions = _check_fractions(fractions)
    if holdout is not None:
        check_domain(holdout, corpus.domains, field="holdout")
        if len(corpus.domains) < 2:
            raise ConfigError("holdout", "needs a corpus with at least two domains")
    parts: dict[tuple[str, str], tuple[Document, ...]] = {}
    for domain, documents in corpus.documents.items():
        for split, docs in split_domain(documents, fractions, seed).items():
            parts[(domain, split)] = docs
    return CorpusSplits(corpus=corpus, fractions=fractions, seed=seed, holdout=holdout, parts=parts)


def _check_fractions(fractions) -> tuple[float, float, float]:
    values = tuple(fractions)
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise ConfigError("fractions", f"got {fractions!r}, expected three numbers (train, validation, test)")
    if any(v < 0 for v in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6) or values[0] <= 0:
        raise ConfigError(
            "fractions", f"got {values}, expected non-negative numbers summing to 1 with train > 0"
        )
    return (float(values[0]), float(values[1]), float(values[2]))
