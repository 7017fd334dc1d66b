"""Batches for a causal LM: an endless, seeded, resumable training stream and one-pass evaluation.

Two layouts. `packed`: segments follow each other and rows are cut every S tokens, so a row may
hold the end of one document and the start of the next. `padded`: each row holds one piece of one
document (its first S tokens, then its next S, ...) and padding. Either way every target of a
document is seen exactly once per epoch.

The training stream walks the training documents in an order reshuffled every epoch from the seed
and each document's id. Its whole state is, per walk, (epoch, index in the epoch's order, offset
in the document), plus the number of batches drawn: a few integers that go into a JSON checkpoint
and bring the stream back to exactly where it stopped. With `single_domain=True` every batch comes
from one domain (picked per batch from the seed), for balancing experiments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moekit.data.batch import IGNORE_INDEX, Batch
from moekit.data.segments import Segments
from moekit.errors import ConfigError, MoekitError, require_choice, require_int

LAYOUTS = ("packed", "padded")
DOMAIN_SAMPLING = ("proportional", "uniform")
STREAMS = ("mixed", "sequential")
STATE_FORMAT = "moekit-train-batches"
STATE_VERSION = 1


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int
    seq_len: int
    layout: str = "packed"
    seed: int = 0
    single_domain: bool = False
    domain_sampling: str = "proportional"  # how single-domain batches pick their domain
    stream: str = "mixed"  # rows from independent lanes (mixed) or consecutive rows of one walk

    def __post_init__(self) -> None:
        require_int("batch_size", self.batch_size, minimum=1)
        require_int("seq_len", self.seq_len, minimum=1)
        require_int("seed", self.seed)
        require_choice("layout", self.layout, LAYOUTS)
        require_choice("domain_sampling", self.domain_sampling, DOMAIN_SAMPLING)
        require_choice("stream", self.stream, STREAMS)


@dataclass(frozen=True)
class Piece:
    """Tokens [start, start + length) of the flat token array, all from segment `segment`."""

    start: int
    length: int
    segment: int


def _unit_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class Walk:
    """A cursor over a list of segments, handing out pieces in order.

    With `shuffle_key` set it never ends: epoch e visits the segments sorted by a hash of
    (key, e, document id), an order that needs no random state and is the same on every machine.
    Without it, it visits them once in the given order.
    """

    def __init__(self, segments: Segments, members: np.ndarray, shuffle_key: str | None = None) -> None:
        if len(members) == 0:
            raise ConfigError("data", "no documents to draw batches from")
        self.segments = segments
        self.members = members
        self.shuffle_key = shuffle_key
        self.epoch, self.index, self.offset = 0, 0, 0
        self._order_epoch, self._order = -1, members

    @property
    def exhausted(self) -> bool:
        return self.shuffle_key is None and self.index >= len(self.members)

    def order(self, epoch: int) -> np.ndarray:
        if self.shuffle_key is None:
            return self.members
        if epoch != self._order_epoch:
            ids = self.segments.ids
            keys = [_unit_hash(f"{self.shuffle_key}/{epoch}/{ids[m]}") for m in self.members]
            self._order = self.members[np.argsort(np.array(keys, dtype=np.uint64), kind="stable")]
            self._order_epoch = epoch
        return self._order

    def take(self, max_length: int) -> Piece | None:
        """The next piece of at most `max_length` tokens (never past the end of its segment)."""
        if self.exhausted:
            return None
        segment = int(self.order(self.epoch)[self.index])
        begin, end = int(self.segments.starts[segment]), int(self.segments.starts[segment + 1])
        length = min(max_length, end - begin - self.offset)
        piece = Piece(begin + self.offset, length, segment)
        self.offset += length
        if begin + self.offset == end:
            self.offset = 0
            self.index += 1
            if self.shuffle_key is not None and self.index == len(self.members):
                self.epoch, self.index = self.epoch + 1, 0
        return piece

    def state(self) -> list[int]:
        return [self.epoch, self.index, self.offset]

    def restore(self, state: Any, where: str) -> None:
        valid = isinstance(state, list) and len(state) == 3 and all(type(v) is int and v >= 0 for v in state)
        if not valid or state[1] >= len(self.members):
            raise MoekitError(
                f"data state: {where} should be [epoch, index, offset] within the data, got {state!r}"
            )
        segment = int(self.order(state[0])[state[1]])
        if state[2] >= int(self.segments.starts[segment + 1] - self.segments.starts[segment]):
            raise MoekitError(f"data state: {where} offset {state[2]} is past the end of its document")
        self.epoch, self.index, self.offset = state


def next_row(walk: Walk, seq_len: int, layout: str) -> list[Piece]:
    """One row: pieces until S tokens (packed), or one piece (padded). Empty when the walk ended."""
    if layout == "padded":
        piece = walk.take(seq_len)
        return [piece] if piece else []
    pieces, filled = [], 0
    while filled < seq_len:
        piece = walk.take(seq_len - filled)
        if piece is None:
            break
        pieces.append(piece)
        filled += piece.length
    return pieces


def assemble_batch(rows: list[list[Piece]], segments: Segments, seq_len: int, pad_id: int) -> Batch:
    """Fill the six [B, S] tensors from the pieces of each row; the rest is padding."""
    shape = (len(rows), seq_len)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    token_mask = np.zeros(shape, dtype=bool)
    doc_ids = np.full(shape, -1, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    domains = np.full(shape, -1, dtype=np.int64)
    piece_number = 0
    for row, pieces in enumerate(rows):
        column = 0
        for piece in pieces:
            span = slice(column, column + piece.length)
            source = slice(piece.start, piece.start + piece.length)
            input_ids[row, span] = segments.tokens[source]
            targets[row, span] = segments.next_tokens[source]
            token_mask[row, span] = True
            doc_ids[row, span] = piece_number
            positions[row, span] = np.arange(piece.length)
            domains[row, span] = segments.domains[piece.segment]
            piece_number += 1
            column += piece.length
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        targets=torch.from_numpy(targets),
        token_mask=torch.from_numpy(token_mask),
        doc_ids=torch.from_numpy(doc_ids),
        positions=torch.from_numpy(positions),
        domains=torch.from_numpy(domains),
    )


class TrainBatches(Iterator[Batch]):
    """The endless training stream over `segments` restricted to the labels in `domains`."""

    def __init__(
        self,
        segments: Segments,
        domains: Mapping[int, str],
        config: LoaderConfig,
        *,
        pad_id: int,
        fingerprint: str = "",
    ) -> None:
        """`domains` maps the label of each training domain to its name (used as a key in the state)."""
        self.segments, self.config, self.pad_id = segments, config, pad_id
        self.fingerprint = fingerprint
        self.batches = 0
        key = f"train/{config.seed}"
        if config.single_domain:
            present = [label for label in domains if len(segments.members(label))]
            self.groups = {
                domains[label]: self._lanes(segments.members(label), f"{key}/{domains[label]}")
                for label in present
            }
            tokens = np.array([segments.token_count(label) for label in present], dtype=np.float64)
            weights = tokens if config.domain_sampling == "proportional" else np.ones(len(present))
            self._cumulative = np.cumsum(weights / weights.sum()) if present else np.zeros(0)
        else:
            members = [segments.members(label) for label in domains]
            everything = np.sort(np.concatenate(members)) if members else np.zeros(0, dtype=np.int64)
            if len(everything) == 0:
                raise ConfigError("data", "no documents to draw batches from")
            self.groups = {"all": self._lanes(everything, key)}
        if not self.groups:
            raise ConfigError("data", "no training documents in the training domains")
        self.walks = {
            (name if len(lanes) == 1 and config.stream == "sequential" else f"{name}/{i}"): walk
            for name, lanes in self.groups.items()
            for i, walk in enumerate(lanes)
        }

    def _lanes(self, members: np.ndarray, key: str) -> list[Walk]:
        """One walk (sequential), or the documents dealt into one lane per row (mixed): sorted by a
        seeded hash, lane i takes every L-th, so lanes differ in size by at most one document."""
        if self.config.stream == "sequential":
            return [Walk(self.segments, members, key)]
        ids = self.segments.ids
        keys = np.array([_unit_hash(f"{key}/lanes/{ids[m]}") for m in members], dtype=np.uint64)
        dealt = members[np.argsort(keys, kind="stable")]
        count = min(self.config.batch_size, len(members))
        return [Walk(self.segments, np.sort(dealt[i::count]), f"{key}/lane{i}") for i in range(count)]

    def _group_for_batch(self, number: int) -> list[Walk]:
        if not self.config.single_domain:
            return self.groups["all"]
        u = _unit_hash(f"domain/{self.config.seed}/{number}") / 2.0**64
        choice = min(int(np.searchsorted(self._cumulative, u, side="right")), len(self.groups) - 1)
        return list(self.groups.values())[choice]

    def __next__(self) -> Batch:
        lanes = self._group_for_batch(self.batches)
        rows = [
            next_row(lanes[row % len(lanes)], self.config.seq_len, self.config.layout)
            for row in range(self.config.batch_size)
        ]
        self.batches += 1
        return assemble_batch(rows, self.segments, self.config.seq_len, self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-ready state: load it into an identical stream to continue exactly here."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "batches": self.batches,
            "walks": {name: walk.state() for name, walk in self.walks.items()},
        }

    def load_state_dict(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise MoekitError(f"data state: expected a {STATE_FORMAT!r} object")
        if state.get("version") != STATE_VERSION:
            raise MoekitError(f"data state: version {state.get('version')!r}, expected {STATE_VERSION}")
        if state.get("fingerprint") != self.fingerprint:
            raise MoekitError(
                "data state: saved for another corpus, split, tokenizer or loader setting "
                f"(fingerprint {str(state.get('fingerprint'))[:12]}, this stream {self.fingerprint[:12]})"
            )
        walks, batches = state.get("walks"), state.get("batches")
        if type(batches) is not int or batches < 0:
            raise MoekitError(f"data state: 'batches' should be a non-negative integer, got {batches!r}")
        if not isinstance(walks, dict) or set(walks) != set(self.walks):
            raise MoekitError(f"data state: 'walks' should have the keys {sorted(self.walks)}")
        for name, walk in self.walks.items():
            walk.restore(walks[name], f"walks[{name!r}]")
        self.batches = batches


def eval_batches(
    segments: Segments, members: np.ndarray, batch_size: int, seq_len: int, layout: str, pad_id: int
) -> Iterator[Batch]:
    """One pass over `members` in order; the last batch may have fewer rows, its last row padding."""
    require_choice("layout", layout, LAYOUTS)
    if len(members) == 0:
        return
    walk = Walk(segments, members)
    while not walk.exhausted:
        rows = []
        while len(rows) < batch_size and not walk.exhausted:
            rows.append(next_row(walk, seq_len, layout))
        yield assemble_batch(rows, segments, seq_len, pad_id)
