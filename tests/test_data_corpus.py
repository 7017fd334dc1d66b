"""The shipped sample against its manifest, corpus integrity checks, and deterministic builds."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from moekit.data import build as build_module
from moekit.data.build import build_corpus, build_from_recipe, load_corpus, sample_dir
from moekit.data.corpus import MANIFEST_NAME, Document, open_corpus
from moekit.data.domains import DOMAINS
from moekit.data.mathgen import generate_problem
from moekit.data.recipes import (
    STDLIB_SHA256,
    TZDATA_SHA256,
    DomainRecipe,
    Recipe,
    builtin_recipe,
    sample_recipe,
)
from moekit.data.recordgen import generate_record_document
from moekit.data.sources.base import BuildContext
from moekit.data.sources.chatterbot import ChatterbotDialogues
from moekit.data.sources.generated import GeneratedMath, GeneratedRecords
from moekit.data.sources.shakespeare import ShakespeareWorks
from moekit.data.sources.stdlib_code import StdlibCode
from moekit.data.sources.tables import TzdataTables
from moekit.errors import ConfigError, MoekitError

SAMPLE = sample_dir()


def sample_manifest() -> dict:
    return json.loads((SAMPLE / MANIFEST_NAME).read_text())


def test_sample_files_match_the_manifest_recomputed_independently():
    manifest = sample_manifest()
    assert [e["name"] for e in manifest["domains"]] == list(DOMAINS)
    for entry in manifest["domains"]:
        data = (SAMPLE / entry["file"]).read_bytes()
        assert len(data) == entry["file_bytes"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        records = [json.loads(line) for line in data.decode("utf-8").splitlines()]
        assert len(records) == entry["documents"]
        assert sum(len(r["text"].encode("utf-8")) for r in records) == entry["text_bytes"]
        for source in entry["sources"]:
            prefix = f"{entry['name']}/{source['name']}/"
            assert sum(r["id"].startswith(prefix) for r in records) == source["documents"]
            assert source["licence"] and source["version"] and source["origin"]
            assert re.fullmatch(r"[0-9a-f]{64}", source["input_sha256"])
        assert sum(s["documents"] for s in entry["sources"]) == entry["documents"]
        assert entry["fallback"] is None
    for key in ("documents", "text_bytes", "file_bytes"):
        assert manifest["total"][key] == sum(e[key] for e in manifest["domains"])


def test_sample_is_small_and_every_source_is_attributed():
    manifest = sample_manifest()
    sizes = [e["file_bytes"] for e in manifest["domains"]]
    assert all(size <= 400_000 for size in sizes) and sum(sizes) <= 1_500_000
    assert all(e["text_bytes"] >= 100_000 for e in manifest["domains"])
    notice = (SAMPLE / "NOTICE.md").read_text()
    for entry in manifest["domains"]:
        for source in entry["sources"]:
            assert source["version"].split(",")[0] in notice or source["name"] in notice
    for name in re.findall(r"`LICENSES/([^`]+)`", notice):
        assert (SAMPLE / "LICENSES" / name).is_file(), name
    # No machine-specific paths in what is committed; system data locations are documented as such.
    committed = (SAMPLE / MANIFEST_NAME).read_text() + notice
    assert not re.search(r"/(root|home|work|tmp)/", committed)


def test_open_corpus_loads_every_document_of_the_sample():
    corpus = load_corpus("sample")
    assert corpus.domains == DOMAINS
    assert len(corpus) == sample_manifest()["total"]["documents"]
    assert all(d.id.startswith(f"{d.domain}/") for d in corpus)
    assert all(d.answer is not None for d in corpus.documents["math"])
    assert not corpus.fallbacks()


@pytest.fixture
def sample_copy(tmp_path):
    target = tmp_path / "corpus"
    shutil.copytree(SAMPLE, target)
    return target


def test_a_changed_byte_is_reported_with_the_file_name(sample_copy):
    path = sample_copy / "english.jsonl"
    data = bytearray(path.read_bytes())
    data[100] = ord("#") if data[100] != ord("#") else ord("%")
    path.write_bytes(bytes(data))
    with pytest.raises(MoekitError, match=r"english\.jsonl: sha256"):
        open_corpus(sample_copy)


def test_a_manifest_that_lies_about_counts_is_rejected(sample_copy):
    manifest = json.loads((sample_copy / MANIFEST_NAME).read_text())
    manifest["domains"][3]["documents"] += 1
    manifest["total"]["documents"] += 1
    (sample_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(MoekitError, match=r"math\.jsonl: 3600 documents, the manifest says 3601"):
        open_corpus(sample_copy)


def test_a_missing_file_and_a_bad_source_name_give_clear_errors(sample_copy, tmp_path):
    (sample_copy / "code.jsonl").unlink()
    with pytest.raises(MoekitError, match=r"code\.jsonl: listed in the manifest but missing"):
        open_corpus(sample_copy)
    with pytest.raises(ConfigError, match="source"):
        load_corpus("no-such-corpus")
    with pytest.raises(MoekitError, match="corpus manifest not found"):
        open_corpus(tmp_path / "empty")


def test_the_sample_generated_domains_are_what_the_generators_make():
    corpus = load_corpus("sample")
    math_docs = corpus.documents["math"]
    indices = sorted(int(d.id.rsplit("-", 1)[1]) for d in math_docs)
    assert indices == list(range(len(math_docs)))
    for doc in math_docs:
        problem = generate_problem(0, int(doc.id.rsplit("-", 1)[1]))
        assert (doc.text, doc.answer) == (problem.text, problem.answer)
    records = [d for d in corpus.documents["structured"] if d.source == "recordgen"]
    for doc in records:
        kind, text = generate_record_document(0, int(doc.id.rsplit("-", 1)[1]))
        assert doc.id.rsplit("/", 1)[1].startswith(kind) and doc.text == text


def test_recipes_list_the_domains_in_label_order_and_fingerprints_differ():
    for recipe in (builtin_recipe(), sample_recipe()):
        assert tuple(d.domain for d in recipe.domains) == DOMAINS
    assert builtin_recipe().fingerprint == builtin_recipe().fingerprint
    assert builtin_recipe().fingerprint != sample_recipe().fingerprint


def small_recipe() -> Recipe:
    """A fast recipe with every kind of source; the PyPI ones are unavailable offline."""
    return Recipe(
        "small",
        1,
        (
            DomainRecipe(
                "code", (StdlibCode(budget_bytes=40_000, pinned_sha256=STDLIB_SHA256, max_file_bytes=8_000),)
            ),
            DomainRecipe("english", (ShakespeareWorks(budget_bytes=40_000),)),
            DomainRecipe("multilingual", (ChatterbotDialogues(budget_bytes=40_000),)),
            DomainRecipe("math", (GeneratedMath(seed=3, count=300),)),
            DomainRecipe(
                "structured",
                (GeneratedRecords(seed=3, budget_bytes=30_000), TzdataTables(pinned_sha256=TZDATA_SHA256)),
            ),
        ),
    )


def offline_context(tmp_path: Path, messages: list[str]) -> BuildContext:
    # allow_unpinned keeps this independent of the exact Python and tzdata versions of the machine.
    return BuildContext(
        download_dir=tmp_path / "no-downloads", offline=True, allow_unpinned=True, log=messages.append
    )


def test_building_twice_gives_identical_bytes_and_falls_back_per_domain(tmp_path):
    messages: list[str] = []
    sample = load_corpus("sample")
    first = build_from_recipe(
        small_recipe(), tmp_path / "a", offline_context(tmp_path, messages), fallback=sample
    )
    second = build_from_recipe(small_recipe(), tmp_path / "b", offline_context(tmp_path, []), fallback=sample)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first.manifest == second.manifest
    fallbacks = first.fallbacks()
    assert set(fallbacks) == {"english", "multilingual"}
    assert all("offline" in reason for reason in fallbacks.values())
    assert first.documents["english"] == sample.documents["english"]
    assert any("using the shipped sample" in m for m in messages)
    assert len(first.documents["math"]) == 300 and first.documents["code"]


def test_without_a_fallback_an_unavailable_source_is_an_error(tmp_path):
    with pytest.raises(MoekitError, match="offline"):
        build_from_recipe(small_recipe(), tmp_path / "c", offline_context(tmp_path, []), fallback=None)


def test_a_digest_mismatch_is_refused_unless_unpinned_is_allowed(tmp_path):
    recipe = Recipe("pins", 1, (DomainRecipe("structured", (TzdataTables(pinned_sha256="0" * 64),)),))
    strict = BuildContext(download_dir=tmp_path, offline=True, log=lambda m: None)
    with pytest.raises(MoekitError, match="differs from the pinned"):
        build_from_recipe(recipe, tmp_path / "strict", strict, fallback=None)
    messages: list[str] = []
    relaxed = BuildContext(download_dir=tmp_path, offline=True, allow_unpinned=True, log=messages.append)
    corpus = build_from_recipe(recipe, tmp_path / "relaxed", relaxed, fallback=None)
    assert len(corpus.documents["structured"]) == 3 and any("warning" in m for m in messages)


def test_load_builtin_builds_once_then_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "builtin_recipe", small_recipe)
    messages: list[str] = []
    kwargs = dict(cache_dir=tmp_path, offline=True, allow_unpinned=True, log=messages.append)
    built = load_corpus("builtin", **kwargs)
    built_log = list(messages)
    messages.clear()
    again = load_corpus("builtin", **kwargs)
    assert again.manifest == built.manifest
    assert any("documents" in m for m in built_log) and not any("documents," in m for m in messages)
    assert any("is the shipped sample" in m for m in messages)  # fallbacks are reported on every load
    (tmp_path / "builtin" / "math.jsonl").write_text("damaged\n")
    messages.clear()
    repaired = load_corpus("builtin", **kwargs)
    assert repaired.manifest == built.manifest and any("damaged" in m for m in messages)


def test_copying_the_sample_reproduces_it(tmp_path):
    corpus = build_corpus(tmp_path / "copy", "sample")
    assert corpus.manifest == sample_manifest()
    for path in SAMPLE.rglob("*"):
        if path.is_file():
            assert (tmp_path / "copy" / path.relative_to(SAMPLE)).read_bytes() == path.read_bytes()


def test_duplicate_document_ids_are_rejected(tmp_path):
    class Twice:
        name = "twice"

        def collect(self, domain, context):
            collected = GeneratedMath(seed=0, count=2).collect(domain, context)
            doc = collected.documents[0]
            return type(collected)((doc, Document(doc.id, domain, "other", answer="1")), collected.provenance)

    recipe = Recipe("dup", 1, (DomainRecipe("math", (Twice(),)),))
    with pytest.raises(MoekitError, match="occurs twice"):
        build_from_recipe(
            recipe, tmp_path, BuildContext(download_dir=tmp_path, log=lambda m: None), fallback=None
        )


@pytest.mark.slow
def test_full_builtin_build_offline_is_deterministic_and_falls_back(tmp_path):
    empty = tmp_path / "downloads"
    first = build_corpus(tmp_path / "a", "builtin", download_dir=empty, offline=True, log=lambda m: None)
    second = build_corpus(tmp_path / "b", "builtin", download_dir=empty, offline=True, log=lambda m: None)
    assert first.manifest == second.manifest
    assert {"english", "multilingual"} <= set(first.fallbacks())
