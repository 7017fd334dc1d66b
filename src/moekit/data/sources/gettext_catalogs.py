"""Translated program messages from the gettext catalogs (.mo) in /usr/share/locale.

Debian installs thousands of catalogs with the programs on the machine; their translations are real
text in many languages and scripts. They are read from this well-known system location at build
time and never shipped (their licences are those of each package, mostly GPL-2+ or LGPL-2.1+).
One catalog in one language is a document (cut into parts when long).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from moekit.data.corpus import Document
from moekit.data.sources.base import (
    BuildContext,
    Collected,
    Provenance,
    SourceUnavailable,
    check_pin,
    document_id,
    tree_digest,
)
from moekit.data.sources.selection import LINE, split_text, take_within_budget, utf8_len

LOCALE_DIR = Path("/usr/share/locale")
_CHARSET = re.compile(r"charset=([A-Za-z0-9_.:-]+)")


def read_mo(data: bytes) -> list[tuple[str, str]]:
    """(msgid, translation) pairs of a compiled catalog; plural forms become separate pairs.

    Raises ValueError when the bytes are not a catalog or its text does not decode.
    """
    if len(data) < 20:
        raise ValueError("too short for a .mo file")
    magic = struct.unpack("<I", data[:4])[0]
    order = {0x950412DE: "<", 0xDE120495: ">"}.get(magic)
    if order is None:
        raise ValueError("not a .mo file (bad magic number)")
    count, originals, translations = struct.unpack(f"{order}3I", data[8:20])
    raw = []
    for index in range(count):
        length, offset = struct.unpack(f"{order}2I", data[originals + 8 * index : originals + 8 * index + 8])
        t_length, t_offset = struct.unpack(
            f"{order}2I", data[translations + 8 * index : translations + 8 * index + 8]
        )
        raw.append((data[offset : offset + length], data[t_offset : t_offset + t_length]))
    charset = "utf-8"
    for msgid, msgstr in raw:
        if msgid == b"":
            found = _CHARSET.search(msgstr.decode("ascii", errors="replace"))
            charset = found.group(1) if found and found.group(1).upper() != "CHARSET" else "utf-8"
    pairs = []
    for msgid, msgstr in raw:
        if msgid == b"":
            continue
        source = msgid.decode(charset).split("\x04")[-1].split("\x00")[0]
        pairs.extend((source, form) for form in msgstr.decode(charset).split("\x00"))
    return pairs


def catalog_text(pairs: list[tuple[str, str]]) -> str:
    """The distinct translations of a catalog in catalog order, one per line; copies of the
    English original (untranslated or purely symbolic strings) are left out."""
    seen, lines = set(), []
    for source, translation in pairs:
        text = translation.strip()
        if text and text != source.strip() and text not in seen:
            seen.add(text)
            lines.append(text)
    return "\n".join(lines)


def catalog_files(locale_dir: Path, languages: tuple[str, ...]) -> list[tuple[str, bytes]]:
    files = []
    for language in languages:
        for path in sorted((locale_dir / language / "LC_MESSAGES").glob("*.mo")):
            files.append((f"{language}/{path.stem}", path.read_bytes()))
    return files


@dataclass(frozen=True)
class GettextCatalogs:
    """Catalogs of `languages`, each language getting an equal share of `budget_bytes`."""

    languages: tuple[str, ...]
    budget_bytes: int
    pinned_sha256: str
    locale_dir: Path = LOCALE_DIR
    max_document_bytes: int = 16_000
    name: str = "gettext"

    def collect(self, domain: str, context: BuildContext) -> Collected:
        files = catalog_files(self.locale_dir, self.languages) if self.locale_dir.is_dir() else []
        if not files:
            raise SourceUnavailable(
                f"{self.name}: no .mo catalogs for {', '.join(self.languages)} in {self.locale_dir}"
            )
        digest = tree_digest(files)
        check_pin(f"gettext catalogs in {self.locale_dir}", digest, self.pinned_sha256, context)
        by_language: dict[str, list[tuple[str, str]]] = {language: [] for language in self.languages}
        for name, data in files:
            try:
                text = catalog_text(read_mo(data))
            except (ValueError, UnicodeDecodeError, LookupError, struct.error):
                continue  # a damaged or oddly encoded catalog: the pin already fixed which ones these are
            parts = split_text(text, self.max_document_bytes, LINE) if text else []
            for index, part in enumerate(parts):
                part_name = name if len(parts) == 1 else f"{name}#{index + 1:02d}"
                by_language[name.split("/", 1)[0]].append((part_name, part))
        share = self.budget_bytes // len(self.languages)
        documents = []
        for language in self.languages:
            chosen = take_within_budget(
                by_language[language], share, size=lambda d: utf8_len(d[1]), name=lambda d: d[0]
            )
            documents.extend(Document(document_id(domain, self.name, n), domain, t) for n, t in chosen)
        provenance = Provenance(
            name=self.name,
            version="catalogs installed on this machine (pinned by digest)",
            origin=f"{self.locale_dir}/<{','.join(self.languages)}>/LC_MESSAGES/*.mo",
            licence="each catalog under its Debian package's licence (mostly GPL-2+ or LGPL-2.1+); "
            "built locally, not redistributed",
            input_sha256=digest,
        )
        return Collected(tuple(sorted(documents, key=lambda d: d.id)), provenance)
