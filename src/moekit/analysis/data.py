"""The analysis dataset: "corpus" or a PATH turned into labelled batches for the recorder.

This is the one place the analysis depends on `moekit.data`. Sources:
- `corpus`: the validation split of the corpus the checkpoint was trained on (its run config's
  `data.source`, default the shipped sample); `sample` / `builtin` name a corpus directly.
- a corpus directory (with manifest.json): every document, labelled by domain.
- a `.jsonl` file (`{"text": ..., "domain": ...}` per line; domain optional), a `.txt` file (one
  document), or a directory of such files: the domain defaults to the file's stem.
Batches alternate between domains (one batch of each in turn), so a few batches cover them all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moekit.errors import MoekitError

CORPUS_NAMES = ("corpus", "sample", "builtin")
TEXT_SUFFIXES = (".jsonl", ".txt")


@dataclass(frozen=True)
class AnalysisData:
    batches: list[Any]  # moekit.data.Batch
    domain_names: tuple[str, ...]
    description: str


class HFTokenizer:
    """A Hugging Face `tokenizer.json` behind the interface moekit's loaders use."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise MoekitError(f"{directory}: no tokenizer.json; the analysis needs the model's tokenizer")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise MoekitError(f"{path}: not a tokenizers JSON file ({exc})") from None
        config = _read_optional_json(directory / "config.json")
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.eos_id = _first_id(config.get("eos_token_id"), 0)
        self.bos_id = _first_id(config.get("bos_token_id"), self.eos_id)
        self.pad_id = _first_id(config.get("pad_token_id"), self.eos_id)
        self._fingerprint = "hf-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids))


def _first_id(value: Any, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    from moekit.io import read_json

    data = read_json(path)
    return data if isinstance(data, dict) else {}


def checkpoint_tokenizer(checkpoint: Path, data_config: Mapping[str, Any]) -> Any:
    """The tokenizer a moekit run trained with: a `tokenizer.json` saved beside the checkpoint (in
    it, its parent or the run directory), else rebuilt from the run's data config (byte, or the
    deterministic BPE trained on the run corpus's training split)."""
    from moekit.data.tokenizer import BpeTokenizer, ByteTokenizer

    checkpoint = Path(checkpoint)
    for directory in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (directory / "tokenizer.json").is_file():
            return BpeTokenizer.load(directory / "tokenizer.json")
    kind = data_config.get("tokenizer", "byte")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        from moekit.data.lmdata import prepare_data

        options = {k: data_config[k] for k in ("bpe_vocab_size", "holdout", "split_seed") if k in data_config}
        if "cache_dir" in data_config:
            options["cache_dir"] = Path(data_config["cache_dir"])
        return prepare_data(
            _run_corpus(data_config), tokenizer="bpe", log=lambda _: None, **options
        ).tokenizer
    raise MoekitError(f"{checkpoint}: config.data.tokenizer is {kind!r}, expected 'byte' or 'bpe'")


def _cache_dir(data_config: Mapping[str, Any]) -> Path | None:
    value = data_config.get("cache_dir")
    return Path(value) if value else None


def _run_corpus(data_config: Mapping[str, Any]) -> str:
    source = data_config.get("source", data_config.get("corpus", "sample"))
    return str(source)


def _documents_from_files(path: Path) -> list[Any]:
    from moekit.data.corpus import Document

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES)
    if not files:
        raise MoekitError(f"{path}: no .jsonl or .txt files to analyse")
    documents = []
    for file in files:
        if file.suffix not in TEXT_SUFFIXES:
            raise MoekitError(f"{file}: expected a .jsonl or .txt file, or a corpus directory")
        text = file.read_text(encoding="utf-8", errors="replace")
        if file.suffix == ".txt":
            documents.append(Document(id=f"{file.stem}/file/0", domain=file.stem, text=text))
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoekitError(f"{file}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise MoekitError(f'{file}:{number}: expected an object with a "text" string')
            domain = str(record.get("domain", file.stem))
            documents.append(
                Document(id=f"{domain}/file/{file.stem}-{number}", domain=domain, text=record["text"])
            )
    return documents


def _source_documents(source: str | Path, data_config: Mapping[str, Any]) -> tuple[dict[str, list[Any]], str]:
    """Documents by domain (in label order) and a description of where they came from."""
    from moekit.data.build import load_corpus
    from moekit.data.splits import split_corpus

    if str(source) in CORPUS_NAMES:
        name = _run_corpus(data_config) if str(source) == "corpus" else str(source)
        corpus = load_corpus(name, cache_dir=_cache_dir(data_config), log=lambda _: None)
        options = {k: data_config[k] for k in ("holdout",) if k in data_config}
        splits = split_corpus(corpus, seed=int(data_config.get("split_seed", 0)), **options)
        by_domain = {d: list(splits.documents("validation", d)) for d in splits.domains}
        return by_domain, f"validation split of corpus {name!r}"
    path = Path(source)
    if not path.exists():
        raise MoekitError(
            f"{path}: data not found (expected 'corpus', a corpus directory, a .jsonl or .txt file)"
        )
    if (path / "manifest.json").is_file():
        corpus = load_corpus(path, log=lambda _: None)
        return {d: list(corpus.documents[d]) for d in corpus.domains}, f"corpus {path}"
    by_domain: dict[str, list[Any]] = {}
    for document in _documents_from_files(path):
        by_domain.setdefault(document.domain, []).append(document)
    return by_domain, f"text from {path}"


def _interleave(streams: list[Iterator[Any]], limit: int) -> list[Any]:
    batches: list[Any] = []
    while streams and len(batches) < limit:
        for stream in list(streams):
            batch = next(stream, None)
            if batch is None:
                streams.remove(stream)
            elif len(batches) < limit:
                batches.append(batch)
    return batches


def analysis_batches(
    source: str | Path,
    tokenizer: Any,
    *,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    layout: str = "packed",
    data_config: Mapping[str, Any] | None = None,
) -> AnalysisData:
    """Up to `num_batches` batches of `source`, alternating between its domains."""
    from moekit.data.loader import eval_batches
    from moekit.data.segments import encode_segments

    by_domain, description = _source_documents(source, data_config or {})
    names = tuple(by_domain)
    documents = [d for name in names for d in by_domain[name]]
    if not documents:
        raise MoekitError(f"{source}: no documents to analyse")
    segments = encode_segments(documents, tokenizer, {name: i for i, name in enumerate(names)})
    streams = [
        eval_batches(segments, segments.members(label), batch_size, seq_len, layout, tokenizer.pad_id)
        for label in range(len(names))
    ]
    batches = _interleave(streams, num_batches)
    if not batches:
        raise MoekitError(f"{source}: no tokens to analyse")
    return AnalysisData(batches, names, description)
