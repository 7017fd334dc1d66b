"""The data of a domain-expert run: the project corpus with training restricted to some domains.

A branch trains on one domain; the post-mix training and every evaluation use the recipe's
domains. The corpus is moekit's (`sample`, `builtin`, or a corpus directory: one JSON-lines file
of documents per domain, see `moekit.data.corpus`), so every model sees the same tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moekit.data.lmdata import LanguageModelData, prepare_data
from moekit.data.loader import TrainBatches
from moekit.errors import ConfigError, MoekitError


class DomainData(LanguageModelData):
    """`LanguageModelData` whose training stream draws only from `training_domains`, in equal shares."""

    def __init__(self, base: LanguageModelData, training_domains: Sequence[str], field: str = "domains"):
        super().__init__(base.splits, base.tokenizer)
        self._segments = base._segments  # share the encoded splits
        check_domains(training_domains, base.domains, field)
        self.training_domains = tuple(training_domains)

    def fingerprint(self, config) -> str:
        own = super().fingerprint(config)
        return hashlib.sha256(f"{own}/{','.join(self.training_domains)}".encode()).hexdigest()

    def train_batches(self, batch_size: int, seq_len: int, **options) -> TrainBatches:
        """With several training domains every batch holds one domain, drawn uniformly: each
        domain gets an equal share of the budget, whatever its number or length of documents (a
        mixed stream over the built-in corpus is mostly its many short math documents)."""
        if len(self.training_domains) > 1:
            options = {**options, "single_domain": True, "domain_sampling": "uniform"}
        stream = super().train_batches(batch_size, seq_len, **options)
        labels = {self.domains.index(d): d for d in self.training_domains}
        return TrainBatches(
            self.segments("train"),
            labels,
            stream.config,
            pad_id=self.tokenizer.pad_id,
            fingerprint=self.fingerprint(stream.config),
        )


def check_domains(domains: Sequence[str], known: Sequence[str], field: str = "domains") -> None:
    """Distinct names, each a domain of the corpus."""
    if not domains:
        raise ConfigError(field, "expected at least one domain")
    for name in domains:
        if name not in known:
            raise ConfigError(field, f"got {name!r}, expected domains of the corpus: {', '.join(known)}")
    if len(set(domains)) != len(domains):
        raise ConfigError(field, f"got {list(domains)}, expected distinct domains")


def corpus_domains(source: str, field: str = "source") -> tuple[str, ...]:
    """The domain names of the corpus `source` without building or reading its documents (the
    built-in corpus takes seconds to build on first use): 'sample' and 'builtin' from what ships,
    a corpus folder from its manifest. Errors name `field` (the option or recipe field the user
    wrote) and what was expected."""
    from moekit.data.build import load_sample
    from moekit.data.corpus import MANIFEST_NAME, _check_manifest_shape
    from moekit.data.recipes import builtin_recipe
    from moekit.io import read_json

    if not isinstance(source, str) or not source:
        raise ConfigError(field, f"got {source!r}, expected 'sample', 'builtin' or a corpus folder")
    if source == "sample":
        return tuple(load_sample().domains)
    if source == "builtin":
        return tuple(d.domain for d in builtin_recipe().domains)
    path = Path(source)
    if not (path / MANIFEST_NAME).is_file():
        what = "no such folder" if not path.exists() else f"no {MANIFEST_NAME} there"
        raise ConfigError(
            field,
            f"got {source!r} ({what}), expected 'sample', 'builtin' or a corpus folder "
            f"(with a {MANIFEST_NAME})",
        )
    try:
        manifest = read_json(path / MANIFEST_NAME, "corpus manifest")
        _check_manifest_shape(path / MANIFEST_NAME, manifest)
    except MoekitError as exc:
        raise ConfigError(field, str(exc)) from None
    return tuple(entry["name"] for entry in manifest["domains"])


def load_data(
    source: str,
    tokenizer: str = "byte",
    bpe_vocab_size: int = 4096,
    log: Callable[[str], None] = print,
    field: str | None = None,
) -> LanguageModelData:
    """The corpus `source` split and tokenized; with `field`, an unusable source is reported under
    that name (the option or recipe field the user wrote) instead of `source`."""
    try:
        return prepare_data(source, tokenizer=tokenizer, bpe_vocab_size=bpe_vocab_size, log=log)
    except ConfigError as exc:
        if field is None or exc.field != "source":
            raise
        raise exc.renamed(field) from None


def calibration_ids(
    data: LanguageModelData, domain: str, *, documents: int = 8, seq_len: int = 64
) -> list[torch.Tensor]:
    """The first `documents` training documents of `domain`, tokenized and cut to `seq_len`, each
    [1, S]: the text that router inits (hidden states, domain embeddings) are computed from."""
    out = []
    for doc in data.splits.documents("train", domain)[:documents]:
        ids = data.tokenizer.encode(doc.text)[:seq_len]
        if len(ids) >= 2:
            out.append(torch.tensor([ids], dtype=torch.long))
    if not out:
        raise ConfigError("domains", f"domain {domain!r} has no training text to calibrate on")
    return out


def corpus_path(source: str) -> str:
    """`source` as stored in manifests: names as they are, folders made absolute."""
    return source if source in ("sample", "builtin") else str(Path(source).resolve())
