"""The code domain: Python source files of the running interpreter's standard library (PSF-2.0).

The standard library is on every machine that runs moekit and is deterministic for a given Python
version; its digest is pinned, so a different Python is noticed instead of silently changing data.
Test suites, IDLE and installed packages are left out: they are not the library's own code.
"""

from __future__ import annotations

import platform
import sysconfig
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
from moekit.data.sources.selection import TOP_LEVEL_STATEMENT, split_text, take_within_budget

EXCLUDED_DIRECTORIES = frozenset(
    {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def library_files(root: Path) -> list[tuple[str, bytes]]:
    """(relative path, bytes) of every .py file under `root` outside tests and installed packages."""
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        parts = relative.parts[:-1]
        if any(p in EXCLUDED_DIRECTORIES or p.startswith("config-") for p in parts) or not path.is_file():
            continue
        files.append((relative.as_posix(), path.read_bytes()))
    return sorted(files)


@dataclass(frozen=True)
class StdlibCode:
    """Whole files chosen in hash order up to `budget_bytes`; files above `max_file_bytes` skipped."""

    budget_bytes: int
    pinned_sha256: str
    max_file_bytes: int | None = None
    max_document_bytes: int = 32_000
    name: str = "cpython-stdlib"

    def collect(self, domain: str, context: BuildContext) -> Collected:
        root = stdlib_root()
        files = library_files(root) if root.is_dir() else []
        if not files:
            raise SourceUnavailable(f"{self.name}: no standard-library sources under {root}")
        version = platform.python_version()
        digest = tree_digest(files)
        check_pin(f"CPython {version} standard library", digest, self.pinned_sha256, context)
        texts = []
        for relative, data in files:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if self.max_file_bytes is None or len(data) <= self.max_file_bytes:
                texts.append((relative, text.replace("\r\n", "\n"), len(data)))
        chosen = take_within_budget(texts, self.budget_bytes, size=lambda f: f[2], name=lambda f: f[0])
        documents = []
        for relative, text, _ in chosen:
            parts = split_text(text, self.max_document_bytes, TOP_LEVEL_STATEMENT)
            for index, part in enumerate(parts):
                name = relative if len(parts) == 1 else f"{relative}#{index + 1:02d}"
                documents.append(Document(document_id(domain, self.name, name), domain, part))
        provenance = Provenance(
            name=self.name,
            version=version,
            origin="the running Python's standard library (sysconfig 'stdlib'), .py files outside tests",
            licence="PSF-2.0",
            input_sha256=digest,
        )
        return Collected(tuple(documents), provenance)
