"""moekit.data: the built-in multi-domain corpus, its splits, tokenizers and training batches.

Names are imported on first use (torch loads only with the loaders), e.g.

    from moekit.data import prepare_data
    data = prepare_data("builtin")            # or "sample", or a corpus directory
    batches = data.train_batches(batch_size=16, seq_len=256)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moekit.lazy_exports import lazy_getattr

_EXPORTS = {
    "DOMAINS": "moekit.data.domains",
    "Document": "moekit.data.corpus",
    "Corpus": "moekit.data.corpus",
    "open_corpus": "moekit.data.corpus",
    "load_corpus": "moekit.data.build",
    "build_corpus": "moekit.data.build",
    "load_sample": "moekit.data.build",
    "default_cache_dir": "moekit.data.build",
    "SPLITS": "moekit.data.splits",
    "CorpusSplits": "moekit.data.splits",
    "split_corpus": "moekit.data.splits",
    "MathProblem": "moekit.data.mathgen",
    "check_answer": "moekit.data.mathgen",
    "generate_problems": "moekit.data.mathgen",
    "ByteTokenizer": "moekit.data.tokenizer",
    "BpeTokenizer": "moekit.data.tokenizer",
    "train_bpe": "moekit.data.tokenizer",
    "Batch": "moekit.data.batch",
    "IGNORE_INDEX": "moekit.data.batch",
    "LoaderConfig": "moekit.data.loader",
    "TrainBatches": "moekit.data.loader",
    "LanguageModelData": "moekit.data.lmdata",
    "prepare_data": "moekit.data.lmdata",
    "train_bpe_for": "moekit.data.lmdata",
}

__all__ = [
    "Batch",
    "BpeTokenizer",
    "ByteTokenizer",
    "Corpus",
    "CorpusSplits",
    "DOMAINS",
    "Document",
    "IGNORE_INDEX",
    "LanguageModelData",
    "LoaderConfig",
    "MathProblem",
    "SPLITS",
    "TrainBatches",
    "build_corpus",
    "check_answer",
    "default_cache_dir",
    "generate_problems",
    "load_corpus",
    "load_sample",
    "open_corpus",
    "prepare_data",
    "split_corpus",
    "train_bpe",
    "train_bpe_for",
]

if TYPE_CHECKING:
    from moekit.data.batch import IGNORE_INDEX, Batch
    from moekit.data.build import build_corpus, default_cache_dir, load_corpus, load_sample
    from moekit.data.corpus import Corpus, Document, open_corpus
    from moekit.data.domains import DOMAINS
    from moekit.data.lmdata import LanguageModelData, prepare_data, train_bpe_for
    from moekit.data.loader import LoaderConfig, TrainBatches
    from moekit.data.mathgen import MathProblem, check_answer, generate_problems
    from moekit.data.splits import SPLITS, CorpusSplits, split_corpus
    from moekit.data.tokenizer import BpeTokenizer, ByteTokenizer, train_bpe

__getattr__ = lazy_getattr(__name__, _EXPORTS)
