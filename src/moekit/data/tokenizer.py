"""Tokenizers: bytes by default, or a byte-level BPE trained locally with the `tokenizers` library.

Both map any Unicode text to ids and back exactly, share the three special tokens every loader
needs (BOS, EOS, PAD), and have a `fingerprint` that changes whenever the id mapping changes, so a
saved data-iterator state cannot be resumed with a different tokenizer. BPE training is
deterministic: the same texts in the same order give the same vocabulary and merges.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from moekit.errors import MoekitError, require_int
from moekit.io import write_atomic

BPE_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")


class Tokenizer(Protocol):
    """What the loaders need from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def fingerprint(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt's token ids as the model saw documents in training: moekit's trainer starts every
    document with the tokenizer's BOS token (`moekit.data.segments`), so a prompt without it puts
    the model off its training distribution at position 0. Tokenizers without a BOS id encode as
    they are."""
    ids = tokenizer.encode(text)
    bos = getattr(tokenizer, "bos_id", None)
    if isinstance(bos, int) and not isinstance(bos, bool) and bos >= 0 and ids[:1] != [bos]:
        return [bos, *ids]
    return ids


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then BOS=256, EOS=257, PAD=258 (vocab 259). Needs no training."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    @property
    def fingerprint(self) -> str:
        return "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Special tokens are dropped; a byte sequence cut inside a character decodes with U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BpeTokenizer:
    """A byte-level BPE from `tokenizers`; special tokens are ids 0-2 and never produced from text."""

    def __init__(self, tokenizer) -> None:
        ids = [tokenizer.token_to_id(token) for token in BPE_SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise MoekitError(f"BPE tokenizer: missing special tokens {', '.join(BPE_SPECIAL_TOKENS)}")
        tokenizer.encode_special_tokens = True  # text that spells '<|eos|>' stays text
        self._tokenizer = tokenizer
        self.pad_id, self.bos_id, self.eos_id = ids
        self.vocab_size = tokenizer.get_vocab_size()
        self._json = tokenizer.to_str()

    @property
    def fingerprint(self) -> str:
        return "bpe-" + hashlib.sha256(self._json.encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        return self._json

    def save(self, path: Path) -> None:
        """Write the tokenizer as the `tokenizers` JSON format, atomically."""
        data = self._json.encode("utf-8")
        write_atomic(Path(path), lambda tmp: tmp.write_bytes(data))

    @classmethod
    def load(cls, path: Path) -> BpeTokenizer:
        from tokenizers import Tokenizer as HfTokenizer

        path = Path(path)
        if not path.is_file():
            raise MoekitError(f"{path}: tokenizer file not found")
        try:
            return cls(HfTokenizer.from_str(path.read_text(encoding="utf-8")))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise MoekitError(f"{path}: not a tokenizers JSON file ({exc})") from None

    def __repr__(self) -> str:
        return f"BpeTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> BpeTokenizer:
    """Train a byte-level BPE on `texts` (their order matters only through counts: it is deterministic)."""
    require_int("vocab_size", vocab_size, minimum=256 + len(BPE_SPECIAL_TOKENS))
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HfTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(tokenizer)
