"""The data side of a language-model run in one object: corpus splits, tokenizer, and their batches.

data = prepare_data("builtin", tokenizer="byte")
train = data.train_batches(batch_size=16, seq_len=256, seed=0)
batch = next(train); state = train.state_dict()          # JSON-ready, resumable
for batch in data.eval_batches("math", "validation", batch_size=16, seq_len=256): ...
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from moekit.data.batch import Batch
from moekit.data.build import default_cache_dir, load_corpus
from moekit.data.domains import check_domain
from moekit.data.loader import LoaderConfig, TrainBatches, eval_batches
from moekit.data.segments import Segments, encode_segments
from moekit.data.splits import DEFAULT_FRACTIONS, SPLITS, CorpusSplits, split_corpus
from moekit.data.tokenizer import BpeTokenizer, ByteTokenizer, Tokenizer, train_bpe
from moekit.errors import ConfigError, require_choice

TOKENIZERS = ("byte", "bpe")


class LanguageModelData:
    """Splits plus a tokenizer; encodes each split once, on first use."""

    def __init__(self, splits: CorpusSplits, tokenizer: Tokenizer) -> None:
        self.splits = splits
        self.tokenizer = tokenizer
        self._segments: dict[str, Segments] = {}

    @property
    def domains(self) -> tuple[str, ...]:
        """Domain names; a batch's `domains` label i means `domains[i]`."""
        return self.splits.domains

    def segments(self, split: str) -> Segments:
        """Every document of `split` (all domains, the held-out one included), tokenized."""
        require_choice("split", split, SPLITS)
        if split not in self._segments:
            documents = [d for domain in self.domains for d in self.splits.documents(split, domain)]
            index = {domain: i for i, domain in enumerate(self.domains)}
            self._segments[split] = encode_segments(documents, self.tokenizer, index)
        return self._segments[split]

    def fingerprint(self, config: LoaderConfig) -> str:
        """Identifies everything a training stream's order depends on."""
        described = {
            "corpus": self.splits.corpus.fingerprint,
            "fractions": self.splits.fractions,
            "split_seed": self.splits.seed,
            "holdout": self.splits.holdout,
            "tokenizer": self.tokenizer.fingerprint,
            "config": [config.batch_size, config.seq_len, config.layout, config.seed],
            "sampling": [config.single_domain, config.domain_sampling, config.stream],
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def train_batches(
        self,
        batch_size: int,
        seq_len: int,
        *,
        layout: str = "packed",
        seed: int = 0,
        single_domain: bool = False,
        domain_sampling: str = "proportional",
        stream: str = "mixed",
    ) -> TrainBatches:
        """The endless training stream over the training domains (the held-out one excluded)."""
        config = LoaderConfig(batch_size, seq_len, layout, seed, single_domain, domain_sampling, stream)
        labels = {self.domains.index(d): d for d in self.splits.training_domains}
        return TrainBatches(
            self.segments("train"),
            labels,
            config,
            pad_id=self.tokenizer.pad_id,
            fingerprint=self.fingerprint(config),
        )

    def eval_batches(
        self, domain: str, split: str = "validation", *, batch_size: int, seq_len: int, layout: str = "packed"
    ) -> Iterator[Batch]:
        """One deterministic pass over one domain's documents of `split` (any split, any domain)."""
        LoaderConfig(batch_size, seq_len, layout)  # validates the arguments
        segments = self.segments(split)
        members = segments.members(self.domains.index(check_domain(domain, self.domains)))
        return eval_batches(segments, members, batch_size, seq_len, layout, self.tokenizer.pad_id)

    def token_counts(self, split: str) -> dict[str, int]:
        segments = self.segments(split)
        return {domain: segments.token_count(i) for i, domain in enumerate(self.domains)}


def train_bpe_for(splits: CorpusSplits, vocab_size: int, cache_dir: Path | None = None) -> BpeTokenizer:
    """A BPE trained on the training split of the training domains only (never on evaluation text,
    never on a held-out domain), cached as JSON under `cache_dir/tokenizers` keyed by all of that."""
    documents = splits.documents("train")
    key = hashlib.sha256(
        json.dumps(
            [splits.corpus.fingerprint, splits.fractions, splits.seed, splits.holdout, vocab_size]
        ).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        return BpeTokenizer.load(path)
    tokenizer = train_bpe((d.text for d in documents), vocab_size=vocab_size)
    if path is not None:
        tokenizer.save(path)
    return tokenizer


def prepare_data(
    source: str | Path = "sample",
    *,
    tokenizer: str = "byte",
    bpe_vocab_size: int = 4096,
    holdout: str | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    split_seed: int = 0,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> LanguageModelData:
    """Load (building if needed) the corpus `source`, split it, and make the tokenizer."""
    require_choice("tokenizer", tokenizer, TOKENIZERS)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus = load_corpus(source, cache_dir=cache, log=log)
    splits = split_corpus(corpus, fractions, holdout=holdout, seed=split_seed)
    if tokenizer == "byte":
        return LanguageModelData(splits, ByteTokenizer())
    if bpe_vocab_size > 65_536:
        raise ConfigError("bpe_vocab_size", f"got {bpe_vocab_size}, expected at most 65536")
    return LanguageModelData(splits, train_bpe_for(splits, bpe_vocab_size, cache))
