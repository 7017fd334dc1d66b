"""Cutting long texts into documents and choosing documents within a byte budget, deterministically.

Both depend only on the texts and their names, never on file-system order or a random state, so a
source yields the same documents on every build.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

PARAGRAPH = re.compile(r"(?<=\n\n)")
TOP_LEVEL_STATEMENT = re.compile(r"(?<=\n\n)(?=[^\s#])")
LINE = re.compile(r"(?<=\n)")


def hash_order(name: str, salt: str = "") -> bytes:
    return hashlib.sha256(f"{salt}\0{name}".encode()).digest()


def take_within_budget(
    items: Sequence[T], budget: int, size: Callable[[T], int], name: Callable[[T], str], salt: str = ""
) -> list[T]:
    """Items visited in hash order of their names, kept while they fit in `budget`; returned in name order.

    Hash order makes the choice a fair, stable sample: adding one candidate changes little.
    """
    kept, used = [], 0
    for item in sorted(items, key=lambda i: hash_order(name(i), salt)):
        cost = size(item)
        if used + cost <= budget:
            kept.append(item)
            used += cost
    return sorted(kept, key=name)


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def split_text(text: str, max_bytes: int, boundary: re.Pattern[str] = PARAGRAPH) -> list[str]:
    """Cut `text` at `boundary` (then at line ends, then anywhere) into parts of at most `max_bytes`.

    Parts keep their inner text exactly; leading and trailing blank lines are dropped. A part is
    longer than `max_bytes` only when a single character is (`max_bytes` < 4).
    """
    parts: list[str] = []
    current = ""
    for piece in _pieces(text, max_bytes, (boundary, LINE)):
        if current and utf8_len(current) + utf8_len(piece) > max_bytes:
            parts.append(current)
            current = ""
        current += piece
    parts.append(current)
    trimmed = [p.strip("\n") for p in parts]
    return [p for p in trimmed if p.strip()]


def _pieces(text: str, max_bytes: int, boundaries: tuple[re.Pattern[str], ...]) -> list[str]:
    """Split at the first boundary; pieces still too long are split at the next one, then by size."""
    if utf8_len(text) <= max_bytes:
        return [text]
    if not boundaries:
        return _hard_cut(text, max_bytes)
    pieces = []
    for piece in boundaries[0].split(text):
        pieces.extend(_pieces(piece, max_bytes, boundaries[1:]))
    return pieces


def _hard_cut(text: str, max_bytes: int) -> list[str]:
    pieces, start, used = [], 0, 0
    for index, char in enumerate(text):
        width = utf8_len(char)
        if used and used + width > max_bytes:
            pieces.append(text[start:index])
            start, used = index, 0
        used += width
    return [*pieces, text[start:]]
