"""Real structured data on every Debian machine: tzdata tables and iso-codes JSON.

The tzdata `.tab` files are public domain and small enough to ship in the sample; the iso-codes
JSON files (LGPL-2.1+) are read at build time only. Both sit in well-known system locations
(/usr/share/zoneinfo, /usr/share/iso-codes/json) and are pinned by digest.
"""

from __future__ import annotations

import json
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
from moekit.data.sources.selection import take_within_budget, utf8_len

ZONEINFO_DIR = Path("/usr/share/zoneinfo")
ISO_CODES_DIR = Path("/usr/share/iso-codes/json")


def _read_files(directory: Path, names: tuple[str, ...] | None, pattern: str) -> list[tuple[str, bytes]]:
    if not directory.is_dir():
        return []
    paths = [directory / n for n in names] if names else sorted(directory.glob(pattern))
    return [(p.name, p.read_bytes()) for p in paths if p.is_file()]


@dataclass(frozen=True)
class TzdataTables:
    """The tab-separated zone and country tables of tzdata, one document per file."""

    pinned_sha256: str
    files: tuple[str, ...] = ("iso3166.tab", "zone.tab", "zone1970.tab")
    directory: Path = ZONEINFO_DIR
    name: str = "tzdata"

    def collect(self, domain: str, context: BuildContext) -> Collected:
        files = _read_files(self.directory, self.files, "*.tab")
        if len(files) != len(self.files):
            raise SourceUnavailable(f"{self.name}: expected {', '.join(self.files)} in {self.directory}")
        digest = tree_digest(files)
        check_pin(f"tzdata tables in {self.directory}", digest, self.pinned_sha256, context)
        documents = tuple(
            Document(document_id(domain, self.name, name), domain, data.decode("utf-8").strip("\n"))
            for name, data in files
        )
        version_file = self.directory / "tzdata.zi"
        first_line = version_file.read_text().split("\n", 1)[0] if version_file.is_file() else ""
        version = first_line.removeprefix("# version ").strip() or "unknown"
        provenance = Provenance(
            name=self.name,
            version=version,
            origin=f"{self.directory}/{{{','.join(self.files)}}}",
            licence="public-domain",
            input_sha256=digest,
        )
        return Collected(documents, provenance)


def json_chunks(name: str, data: bytes, entries_per_document: int) -> list[tuple[str, str]]:
    """A JSON file whose top level maps a key to a list, re-cut into files of a few entries each
    (in the file's own style: two-space indent, UTF-8 kept); other JSON stays whole."""
    loaded = json.loads(data.decode("utf-8"))
    stem = name.removesuffix(".json")
    if not (isinstance(loaded, dict) and len(loaded) == 1 and isinstance(next(iter(loaded.values())), list)):
        return [(stem, json.dumps(loaded, indent=2, ensure_ascii=False))]
    key, entries = next(iter(loaded.items()))
    chunks = []
    for start in range(0, len(entries), entries_per_document):
        part = {key: entries[start : start + entries_per_document]}
        chunks.append(
            (
                f"{stem}#{start // entries_per_document + 1:03d}",
                json.dumps(part, indent=2, ensure_ascii=False),
            )
        )
    return chunks


@dataclass(frozen=True)
class IsoCodesJson:
    """Country, language, script and currency tables of iso-codes, in chunks chosen up to a budget."""

    budget_bytes: int
    pinned_sha256: str
    entries_per_document: int = 40
    directory: Path = ISO_CODES_DIR
    name: str = "iso-codes"

    def collect(self, domain: str, context: BuildContext) -> Collected:
        files = _read_files(self.directory, None, "*.json")
        if not files:
            raise SourceUnavailable(f"{self.name}: no JSON files in {self.directory}")
        digest = tree_digest(files)
        check_pin(f"iso-codes JSON in {self.directory}", digest, self.pinned_sha256, context)
        candidates = []
        try:
            for name, data in files:
                candidates.extend(json_chunks(name, data, self.entries_per_document))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceUnavailable(f"{self.name}: unreadable JSON in {self.directory} ({exc})") from None
        chosen = take_within_budget(
            candidates, self.budget_bytes, size=lambda d: utf8_len(d[1]), name=lambda d: d[0]
        )
        documents = tuple(Document(document_id(domain, self.name, n), domain, t) for n, t in chosen)
        provenance = Provenance(
            name=self.name,
            version="installed on this machine (pinned by digest)",
            origin=f"{self.directory}/*.json",
            licence="LGPL-2.1+; built locally, not redistributed",
            input_sha256=digest,
        )
        return Collected(documents, provenance)
