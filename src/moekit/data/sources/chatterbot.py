"""Dialogues in many languages from the pinned `chatterbot-corpus==1.3.3` sdist (BSD-3-Clause).

Short, natural sentences in 25+ languages and scripts; English and Hinglish files are left out, so
the domain holds only languages other than English. One YAML file (a language and a topic) is one
document: its conversations, one turn per line, a blank line between conversations.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from typing import ClassVar

import yaml

from moekit.data.sources.base import BuildContext, Collected, SourceUnavailable
from moekit.data.sources.pinned import PinnedPackage, fetch_package, package_collected

CHATTERBOT_CORPUS = PinnedPackage(
    name="chatterbot-corpus",
    version="1.3.3",
    filename="chatterbot_corpus-1.3.3.tar.gz",
    sha256="615b5c4c605154f60ae51d03ed918ed92e9d32bc2b144b759bbc64ecdbe18481",
)
_FILE = re.compile(r"^chatterbot_corpus-1\.3\.3/chatterbot_corpus/data/([a-z_]+)/([A-Za-z0-9_ -]+)\.yml$")


def dialogue_text(data: bytes) -> str:
    """The conversations of one corpus file as plain text (all YAML scalars kept as strings)."""
    loaded = yaml.load(data.decode("utf-8"), Loader=yaml.BaseLoader)
    conversations = loaded.get("conversations", []) if isinstance(loaded, dict) else []
    blocks = []
    for conversation in conversations:
        turns = [t.strip() for t in conversation if isinstance(t, str) and t.strip()]
        if turns:
            blocks.append("\n".join(turns))
    return "\n\n".join(blocks)


@dataclass(frozen=True)
class ChatterbotDialogues:
    budget_bytes: int
    excluded_languages: tuple[str, ...] = ("english", "hinglish")
    package: PinnedPackage = CHATTERBOT_CORPUS
    name: str = "chatterbot"
    members: ClassVar[str] = "chatterbot_corpus/data/<language>/*.yml"
    licence: ClassVar[str] = "BSD-3-Clause (Copyright (c) 2017, Gunther Cox)"

    def collect(self, domain: str, context: BuildContext) -> Collected:
        archive = fetch_package(self.package, context)
        candidates = []
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in sorted(tar.getmembers(), key=lambda m: m.name):
                    match = _FILE.match(member.name)
                    if not match or match.group(1) in self.excluded_languages or not member.isfile():
                        continue
                    handle = tar.extractfile(member)
                    text = dialogue_text(handle.read()) if handle else ""
                    if text:
                        candidates.append((f"{match.group(1)}/{match.group(2).replace(' ', '_')}", text))
        except (tarfile.TarError, OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise SourceUnavailable(f"{archive}: cannot read the chatterbot dialogues ({exc})") from None
        return package_collected(self, domain, candidates, archive, "no dialogue files found")
