"""Documents as token segments laid end to end in one array, ready to be cut into batch rows.

Each document becomes the segment [BOS, its tokens..., EOS]. Alongside the tokens, `next_tokens`
holds each token's target: the following token of the same segment, or IGNORE_INDEX at the EOS
that closes it. Cutting rows anywhere therefore never makes a target cross a document boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moekit.data.batch import IGNORE_INDEX
from moekit.data.corpus import Document
from moekit.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Segments:
    tokens: np.ndarray  # int32 [N]
    next_tokens: np.ndarray  # int32 [N], IGNORE_INDEX at each segment's EOS
    starts: np.ndarray  # int64 [D + 1], segment d is tokens[starts[d]:starts[d + 1]]
    domains: np.ndarray  # int64 [D], domain label index of each segment
    ids: tuple[str, ...]  # document id of each segment

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def members(self, domain: int | None = None) -> np.ndarray:
        """Indices of the segments of one domain label (all segments when None)."""
        if domain is None:
            return np.arange(len(self), dtype=np.int64)
        return np.flatnonzero(self.domains == domain).astype(np.int64)

    def token_count(self, domain: int | None = None) -> int:
        return int(self.lengths()[self.members(domain)].sum())


def encode_segments(
    documents: Sequence[Document], tokenizer: Tokenizer, domain_index: Mapping[str, int]
) -> Segments:
    """Tokenize `documents` (in the given order) into one Segments array."""
    encoded = tokenizer.encode_many([d.text for d in documents])
    bos = np.array([tokenizer.bos_id], dtype=np.int32)
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    pieces = []
    for ids in encoded:
        pieces.extend((bos, ids.astype(np.int32, copy=False), eos))
    lengths = np.array([len(ids) + 2 for ids in encoded], dtype=np.int64)
    starts = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    next_tokens = np.empty_like(tokens)
    next_tokens[:-1] = tokens[1:]
    next_tokens[starts[1:] - 1] = IGNORE_INDEX
    return Segments(
        tokens=tokens,
        next_tokens=next_tokens,
        starts=starts,
        domains=np.array([domain_index[d.domain] for d in documents], dtype=np.int64),
        ids=tuple(d.id for d in documents),
    )
