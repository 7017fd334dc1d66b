"""Documents, corpora, and the on-disk corpus format: one JSON-lines file per domain plus a manifest.

A corpus directory holds `manifest.json` and `<domain>.jsonl`; each line is one document,
`{"id": "<domain>/<source>/<name>", "text": ...}` (math documents add `"answer"`). The manifest
records per domain the document count, text and file sizes, sha256, sources, versions and licences;
`open_corpus` recomputes all of them, so a corpus that loads is exactly the one described.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.data.domains import check_domain
from moekit.errors import MoekitError
from moekit.io import read_json, write_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "moekit-corpus"
MANIFEST_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Document:
    """One unit of text that is split, shuffled and held out as a whole: a file, a scene, a catalog...

    `id` is `<domain>/<source>/<name>` and unique in its corpus. `answer` is set on math documents
    only: the exact answer the text ends with.
    """

    id: str
    domain: str
    text: str
    answer: str | None = None

    @property
    def source(self) -> str:
        return self.id.split("/", 2)[1]

    def to_record(self) -> dict[str, str]:
        record = {"id": self.id, "text": self.text}
        if self.answer is not None:
            record["answer"] = self.answer
        return record


@dataclass(frozen=True)
class Corpus:
    """Documents by domain, in manifest order (which fixes the domain label indices)."""

    name: str
    manifest: Mapping[str, Any]
    documents: Mapping[str, tuple[Document, ...]]
    root: Path | None = None

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.documents)

    def domain_index(self, domain: str) -> int:
        return self.domains.index(check_domain(domain, self.domains))

    def __iter__(self) -> Iterator[Document]:
        for docs in self.documents.values():
            yield from docs

    def __len__(self) -> int:
        return sum(len(docs) for docs in self.documents.values())

    @property
    def fingerprint(self) -> str:
        """A digest of the content (the per-domain file checksums): equal fingerprints, equal corpora."""
        digest = hashlib.sha256()
        for entry in self.manifest["domains"]:
            digest.update(f"{entry['name']}={entry['sha256']};".encode())
        return digest.hexdigest()

    def fallbacks(self) -> dict[str, str]:
        """Domains whose sources were unavailable at build time, with the reason (empty if none)."""
        return {e["name"]: e["fallback"] for e in self.manifest["domains"] if e.get("fallback")}

    def summary(self) -> str:
        return format_summary(self.manifest)


def encode_documents(documents: Sequence[Document]) -> bytes:
    """The JSON-lines bytes of one domain file: one compact object per line, UTF-8, ids in order."""
    lines = [json.dumps(doc.to_record(), ensure_ascii=False, separators=(",", ":")) for doc in documents]
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def write_documents(path: Path, documents: Sequence[Document]) -> bytes:
    """Write a domain file atomically; returns the bytes written (for the manifest's checksum)."""
    data = encode_documents(documents)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return data


def read_documents(path: Path, domain: str) -> tuple[Document, ...]:
    """Parse a domain file; every error names the file and line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MoekitError(f"{path}: corpus file not found") from None
    return parse_documents(data, path, domain)


def parse_documents(data: bytes, path: Path, domain: str) -> tuple[Document, ...]:
    """Parse the bytes of a domain file read from `path` (named in errors)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoekitError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MoekitError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise MoekitError(f"{where}: expected an object with a string 'id'")
        if not isinstance(record.get("text"), str):
            raise MoekitError(f"{where}: expected a string 'text'")
        answer = record.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise MoekitError(f"{where}: 'answer' must be a string")
        if not record["id"].startswith(f"{domain}/") or record["id"].count("/") < 2:
            raise MoekitError(f"{where}: id {record['id']!r} should look like '{domain}/<source>/<name>'")
        documents.append(Document(id=record["id"], domain=domain, text=record["text"], answer=answer))
    return tuple(documents)


def open_corpus(root: Path) -> Corpus:
    """Load a corpus directory after checking every file against its manifest."""
    root = Path(root)
    manifest = read_json(root / MANIFEST_NAME, what="corpus manifest")
    _check_manifest_shape(root / MANIFEST_NAME, manifest)
    documents: dict[str, tuple[Document, ...]] = {}
    for entry in manifest["domains"]:
        path = root / entry["file"]
        docs = parse_documents(_read_checked(path, entry), path, entry["name"])
        _check_contents(path, entry, docs)
        documents[entry["name"]] = docs
    return Corpus(name=manifest["name"], manifest=manifest, documents=documents, root=root)


def domain_entry(
    domain: str,
    file: str,
    data: bytes,
    documents: Sequence[Document],
    sources: Sequence[Mapping[str, Any]],
    fallback: str | None,
) -> dict[str, Any]:
    """The manifest entry of one domain file."""
    return {
        "name": domain,
        "file": file,
        "documents": len(documents),
        "text_bytes": sum(len(d.text.encode("utf-8")) for d in documents),
        "file_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "fallback": fallback,
        "sources": [dict(s) for s in sources],
    }


def make_manifest(name: str, recipe_version: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "name": name,
        "recipe_version": recipe_version,
        "domains": entries,
        "total": {key: sum(e[key] for e in entries) for key in ("documents", "text_bytes", "file_bytes")},
    }


def format_summary(manifest: Mapping[str, Any]) -> str:
    """A table of the manifest for people: one row per domain, then sources and licences."""
    rows = [f"corpus {manifest['name']!r} (recipe {manifest['recipe_version']})"]
    rows.append(f"{'domain':<14}{'docs':>8}{'text bytes':>13}{'file bytes':>13}  sha256")
    for e in [*manifest["domains"], {"name": "total", "sha256": "", **manifest["total"]}]:
        sizes = f"{e['documents']:>8}{e['text_bytes']:>13,}{e['file_bytes']:>13,}"
        rows.append(f"{e['name']:<14}{sizes}  {e['sha256'][:16]}".rstrip())
    for e in manifest["domains"]:
        for s in e["sources"]:
            rows.append(f"  {e['name']}: {s['name']} {s['version']} ({s['licence']}), {s['documents']} docs")
        if e.get("fallback"):
            rows.append(f"  {e['name']}: FALLBACK to the shipped sample: {e['fallback']}")
    return "\n".join(rows)


def _check_manifest_shape(path: Path, manifest: Any) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise MoekitError(f"{path}: not a moekit corpus manifest (expected format {MANIFEST_FORMAT!r})")
    if manifest.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise MoekitError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {MANIFEST_FORMAT_VERSION}"
        )
    for key in ("name", "recipe_version", "domains", "total"):
        if key not in manifest:
            raise MoekitError(f"{path}: missing field {key!r}")
    if not isinstance(manifest["domains"], list) or not manifest["domains"]:
        raise MoekitError(f"{path}: 'domains' must be a non-empty list")
    required = ("name", "file", "documents", "text_bytes", "file_bytes", "sha256", "sources")
    for index, entry in enumerate(manifest["domains"]):
        missing = [k for k in required if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise MoekitError(f"{path}: domains[{index}] is missing {', '.join(missing)}")
        if Path(entry["file"]).name != entry["file"]:
            raise MoekitError(
                f"{path}: domains[{index}].file must be a plain file name, got {entry['file']!r}"
            )
    names = [e["name"] for e in manifest["domains"]]
    if len(set(names)) != len(names):
        raise MoekitError(f"{path}: a domain is listed twice in {names}")
    entries = manifest["domains"]
    for key in ("documents", "text_bytes", "file_bytes"):
        if manifest["total"].get(key) != sum(e[key] for e in entries):
            raise MoekitError(f"{path}: total.{key} is not the sum over the domains")


def _read_checked(path: Path, entry: Mapping[str, Any]) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MoekitError(f"{path}: listed in the manifest but missing") from None
    if len(data) != entry["file_bytes"]:
        raise MoekitError(f"{path}: {len(data)} bytes, the manifest says {entry['file_bytes']}")
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry["sha256"]:
        raise MoekitError(f"{path}: sha256 {actual}, the manifest says {entry['sha256']}")
    return data


def _check_contents(path: Path, entry: Mapping[str, Any], docs: tuple[Document, ...]) -> None:
    ids = [d.id for d in docs]
    if ids != sorted(set(ids)):
        raise MoekitError(f"{path}: document ids must be unique and sorted")
    if len(docs) != entry["documents"]:
        raise MoekitError(f"{path}: {len(docs)} documents, the manifest says {entry['documents']}")
    text_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    if text_bytes != entry["text_bytes"]:
        raise MoekitError(f"{path}: {text_bytes} text bytes, the manifest says {entry['text_bytes']}")
    for source in entry["sources"]:
        count = sum(1 for d in docs if d.source == source["name"])
        if count != source.get("documents"):
            raise MoekitError(
                f"{path}: {count} documents from source {source['name']!r}, "
                f"the manifest says {source.get('documents')}"
            )
    if entry["name"] == "math" and any(d.answer is None for d in docs):
        raise MoekitError(f"{path}: every math document needs an 'answer'")
