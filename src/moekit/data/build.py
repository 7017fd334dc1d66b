"""Building corpora from their recipes, and `load_corpus`, the one entry point to get a corpus.

`load_corpus("sample")` is the shipped sample (always there; tests use it). `load_corpus("builtin")`
is the larger corpus, built on first use into the cache directory (default `data/cache/`, or
$MOEKIT_DATA_CACHE) in well under a minute; a domain whose source is unavailable (no network for
pip, a different Python or Debian release) falls back to the sample's documents for that domain,
says so, and records it in the manifest. A rebuild writes byte-identical files.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from moekit.data.corpus import (
    MANIFEST_NAME,
    Corpus,
    Document,
    domain_entry,
    make_manifest,
    open_corpus,
    write_documents,
)
from moekit.data.recipes import Recipe, builtin_recipe
from moekit.data.sources.base import BuildContext, SourceUnavailable
from moekit.errors import ConfigError, MoekitError
from moekit.io import write_atomic, write_json_atomic

SOURCES = ("sample", "builtin")
DEFAULT_CACHE_DIR = Path("data/cache")
CACHE_ENV = "MOEKIT_DATA_CACHE"

Log = Callable[[str], None]


def default_cache_dir() -> Path:
    """$MOEKIT_DATA_CACHE if set, else data/cache under the current directory."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def sample_dir() -> Path:
    """The shipped sample corpus inside the moekit package."""
    return Path(__file__).resolve().parent / "sample"


def load_sample() -> Corpus:
    return open_corpus(sample_dir())


def load_corpus(
    source: str | Path = "sample",
    *,
    cache_dir: Path | None = None,
    rebuild: bool = False,
    offline: bool = False,
    allow_unpinned: bool = False,
    log: Log = print,
) -> Corpus:
    """The corpus named by `source`: 'sample', 'builtin' (built into the cache when missing or
    stale), or the path of a corpus directory (one with a manifest.json)."""
    if source == "sample":
        return load_sample()
    if source == "builtin":
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        root = cache / "builtin"
        recipe = builtin_recipe()
        if not rebuild and (root / MANIFEST_NAME).is_file():
            try:
                corpus = open_corpus(root)
            except MoekitError as exc:
                log(f"cached corpus is damaged ({exc}); rebuilding it")
            else:
                if corpus.manifest.get("recipe_sha256") == recipe.fingerprint:
                    for domain, reason in corpus.fallbacks().items():
                        log(f"note: domain {domain!r} is the shipped sample ({reason}); "
                            "run `moekit data build --source builtin` to retry")  # fmt: skip
                    return corpus
                log(f"{root} was built by another version of the recipe; rebuilding it")
        return build_corpus(
            root,
            "builtin",
            download_dir=cache / "downloads",
            offline=offline,
            allow_unpinned=allow_unpinned,
            log=log,
        )
    check_source(source)
    return open_corpus(Path(source))


def check_source(source: str | Path, field: str = "source") -> None:
    """`source` names a corpus `load_corpus` can open ('sample', 'builtin' or a corpus directory),
    else an error naming `field` (a command's option): checked before any long work."""
    if source in ("sample", "builtin") or (Path(source) / MANIFEST_NAME).is_file():
        return
    raise ConfigError(field, f"got {str(source)!r}, expected 'sample', 'builtin' or a corpus directory")


def build_corpus(
    out_dir: Path,
    source: str = "builtin",
    *,
    download_dir: Path | None = None,
    offline: bool = False,
    allow_unpinned: bool = False,
    log: Log = print,
) -> Corpus:
    """Write the corpus `source` ('sample' or 'builtin') into `out_dir` and return it, checked."""
    out_dir = Path(out_dir)
    if source == "sample":
        return copy_corpus(sample_dir(), out_dir)
    if source != "builtin":
        raise ConfigError("source", f"got {source!r}, expected one of {', '.join(SOURCES)}")
    downloads = Path(download_dir) if download_dir is not None else default_cache_dir() / "downloads"
    context = BuildContext(download_dir=downloads, offline=offline, allow_unpinned=allow_unpinned, log=log)
    return build_from_recipe(builtin_recipe(), out_dir, context, fallback=load_sample())


def build_from_recipe(
    recipe: Recipe, out_dir: Path, context: BuildContext, fallback: Corpus | None
) -> Corpus:
    """Collect every domain of `recipe`, write its files and then the manifest (last, atomically).

    A domain whose source raises SourceUnavailable takes `fallback`'s documents for that domain;
    without a fallback the error propagates.
    """
    entries = []
    for domain_recipe in recipe.domains:
        domain = domain_recipe.domain
        started = time.perf_counter()
        try:
            collected = [source.collect(domain, context) for source in domain_recipe.sources]
            documents = sorted((d for c in collected for d in c.documents), key=lambda d: d.id)
            sources = [c.provenance.manifest_entry(documents) for c in collected]
            reason = None
        except SourceUnavailable as exc:
            if fallback is None or domain not in fallback.documents:
                raise
            reason = str(exc)
            context.log(f"{domain}: {reason}; using the shipped sample for this domain")
            documents = list(fallback.documents[domain])
            sources = next(e["sources"] for e in fallback.manifest["domains"] if e["name"] == domain)
        _check_unique_ids(domain, documents)
        file_name = f"{domain}.jsonl"
        data = write_documents(out_dir / file_name, documents)
        entries.append(domain_entry(domain, file_name, data, documents, sources, reason))
        seconds = time.perf_counter() - started
        context.log(f"{domain}: {len(documents)} documents, {len(data):,} bytes ({seconds:.1f} s)")
    manifest = make_manifest(recipe.name, recipe.version, entries)
    manifest["recipe_sha256"] = recipe.fingerprint
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return open_corpus(out_dir)


def copy_corpus(source_dir: Path, out_dir: Path) -> Corpus:
    """Copy a checked corpus directory (manifest, domain files, notices) to `out_dir`."""
    corpus = open_corpus(source_dir)
    if Path(out_dir).resolve() == Path(source_dir).resolve():
        return corpus
    for path in sorted(Path(source_dir).rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            target = Path(out_dir) / path.relative_to(source_dir)
            write_atomic(target, lambda tmp, src=path: shutil.copyfile(src, tmp))
    write_atomic(
        Path(out_dir) / MANIFEST_NAME, lambda tmp: shutil.copyfile(Path(source_dir) / MANIFEST_NAME, tmp)
    )
    return open_corpus(out_dir)


def _check_unique_ids(domain: str, documents: list[Document]) -> None:
    ids = [d.id for d in documents]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise MoekitError(f"domain {domain!r}: document id {duplicate!r} occurs twice")
