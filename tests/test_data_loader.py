"""Batches: targets are next tokens within a document and never cross a boundary; masks, doc ids,
positions and domains agree in both layouts; one epoch covers every training document once; the
stream resumes exactly from a saved JSON state."""

import hashlib
import json

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from moekit.data.batch import IGNORE_INDEX, Batch
from moekit.data.build import load_sample
from moekit.data.corpus import Corpus, Document
from moekit.data.lmdata import LanguageModelData, prepare_data, train_bpe_for
from moekit.data.splits import split_corpus
from moekit.data.tokenizer import ByteTokenizer
from moekit.errors import ConfigError, MoekitError

SAMPLE_DATA = LanguageModelData(split_corpus(load_sample()), ByteTokenizer())


def in_memory_corpus(texts_by_domain: dict[str, list[str]]) -> Corpus:
    documents = {
        domain: tuple(Document(f"{domain}/t/{i:04d}", domain, text) for i, text in enumerate(texts))
        for domain, texts in texts_by_domain.items()
    }
    entries = [
        {"name": d, "sha256": hashlib.sha256(json.dumps([x.text for x in docs]).encode()).hexdigest()}
        for d, docs in documents.items()
    ]
    return Corpus(name="test", manifest={"domains": entries}, documents=documents)


def check_batch(batch: Batch, tokenizer, layout: str) -> None:
    """Every invariant that one batch must satisfy on its own."""
    ids, targets, mask = batch.input_ids, batch.targets, batch.token_mask
    doc_ids, positions, domains = batch.doc_ids, batch.positions, batch.domains
    assert torch.equal(mask, doc_ids >= 0) and torch.equal(mask, domains >= 0)
    pad = ~mask
    assert (ids[pad] == tokenizer.pad_id).all() and (targets[pad] == IGNORE_INDEX).all()
    assert (positions[pad] == 0).all()
    assert (ids[mask] != tokenizer.pad_id).all()
    # A real token has no target exactly when it is the EOS that closes its document.
    assert torch.equal(mask & (targets == IGNORE_INDEX), mask & (ids == tokenizer.eos_id))
    last_id = -1
    for row in range(ids.shape[0]):
        real = int(mask[row].sum())
        assert mask[row, :real].all(), "padding only at the end of a row"
        runs = torch.unique_consecutive(doc_ids[row, :real], return_counts=True)
        if layout == "padded":
            assert len(runs[0]) <= 1
        start = 0
        for doc, length in zip(runs[0].tolist(), runs[1].tolist(), strict=True):
            assert doc > last_id, "piece ids increase, so each is unique within the batch"
            last_id = doc
            span = slice(start, start + length)
            assert positions[row, span].tolist() == list(range(length))
            assert len(set(domains[row, span].tolist())) == 1
            # inside a piece, each target is the next input token
            assert torch.equal(targets[row, start : start + length - 1], ids[row, start + 1 : start + length])
            start += length


def flatten(batches: list[Batch]) -> tuple[list[int], list[int], list[int]]:
    tokens, targets, domains = [], [], []
    for batch in batches:
        mask = batch.token_mask
        tokens += batch.input_ids[mask].tolist()
        targets += batch.targets[mask].tolist()
        domains += batch.domains[mask].tolist()
    return tokens, targets, domains


def documents_in_stream(tokens: list[int], domains: list[int], tokenizer) -> list[tuple[str, int]]:
    """(decoded text, domain label) of each complete [BOS ... EOS] segment in the token stream."""
    found, start = [], None
    for k, token in enumerate(tokens):
        if token == tokenizer.bos_id:
            assert start is None, "a document starts before the previous one ended"
            start = k
        elif token == tokenizer.eos_id:
            assert start is not None
            assert len(set(domains[start : k + 1])) == 1
            found.append((tokenizer.decode(tokens[start + 1 : k]), domains[start]))
            start = None
    return found


def check_stream_targets(tokens: list[int], targets: list[int], tokenizer) -> None:
    """Across rows and batches: each target is the next token of the same document."""
    for k in range(len(tokens) - 1):
        expected = IGNORE_INDEX if tokens[k] == tokenizer.eos_id else tokens[k + 1]
        assert targets[k] == expected, k


texts = st.lists(st.text(max_size=120), min_size=1, max_size=12)


@given(
    st.fixed_dictionaries({"code": texts, "english": texts, "multilingual": texts}),
    st.sampled_from(["packed", "padded"]),
    st.integers(1, 4),
    st.integers(1, 48),
    st.integers(0, 3),
)
@example(
    {
        "code": ["def f():\n    return 1\n" * 9, ""],
        "english": ["To be, or not. " * 30],
        "multilingual": ["Привет 日本語 " * 9],
    },
    "packed",
    3,
    16,
    1,
)
@example({"code": ["x" * 200], "english": ["é" * 50, "a"], "multilingual": ["한국어"]}, "padded", 2, 7, 0)
def test_one_training_epoch_covers_every_document_once_with_correct_targets(
    corpus_texts, layout, rows, seq, seed
):
    data = LanguageModelData(split_corpus(in_memory_corpus(corpus_texts), (1.0, 0.0, 0.0)), ByteTokenizer())
    stream = data.train_batches(rows, seq, layout=layout, seed=seed, stream="sequential")
    batches = []
    while stream.state_dict()["walks"]["all"][0] == 0:
        batches.append(next(stream))
        check_batch(batches[-1], data.tokenizer, layout)
        assert batches[-1].shape == (rows, seq)
        if layout == "packed":
            assert batches[-1].num_tokens == rows * seq, "training rows are always full when packed"
    tokens, targets, domains = flatten(batches)
    check_stream_targets(tokens, targets, data.tokenizer)
    found = documents_in_stream(tokens, domains, data.tokenizer)
    expected = [(d.text, data.domains.index(d.domain)) for d in data.splits.documents("train")]
    assert sorted(found[: len(expected)]) == sorted(expected)


@given(st.sampled_from(["packed", "padded"]), st.integers(1, 5), st.sampled_from([7, 64, 300]))
def test_evaluation_passes_over_a_domain_once_in_order(layout, rows, seq):
    for domain in ("code", "math"):
        batches = list(
            SAMPLE_DATA.eval_batches(domain, "validation", batch_size=rows, seq_len=seq, layout=layout)
        )
        for batch in batches:
            check_batch(batch, SAMPLE_DATA.tokenizer, layout)
            assert 1 <= batch.shape[0] <= rows and batch.shape[1] == seq
        tokens, targets, domains = flatten(batches)
        check_stream_targets(tokens, targets, SAMPLE_DATA.tokenizer)
        found = documents_in_stream(tokens, domains, SAMPLE_DATA.tokenizer)
        label = SAMPLE_DATA.domains.index(domain)
        assert found == [(d.text, label) for d in SAMPLE_DATA.splits.documents("validation", domain)]
        assert tokens[-1] == SAMPLE_DATA.tokenizer.eos_id


def batches_equal(a: Batch, b: Batch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in Batch.__dataclass_fields__)


@given(
    st.sampled_from(["packed", "padded"]),
    st.booleans(),
    st.integers(0, 12),
    st.integers(0, 2),
    st.sampled_from(["mixed", "sequential"]),
)
def test_resuming_from_a_saved_state_gives_the_same_batches(
    layout, single_domain, stop_at, seed, stream_kind
):
    def stream():
        return SAMPLE_DATA.train_batches(
            4, 96, layout=layout, seed=seed, single_domain=single_domain, stream=stream_kind
        )

    uninterrupted = stream()
    expected = [next(uninterrupted) for _ in range(stop_at + 6)]
    first = stream()
    for _ in range(stop_at):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = stream()
    resumed.load_state_dict(state)
    assert all(batches_equal(next(resumed), b) for b in expected[stop_at:])
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_a_state_from_another_stream_or_a_damaged_state_is_refused():
    state = SAMPLE_DATA.train_batches(4, 64, seed=0, stream="sequential").state_dict()
    with pytest.raises(MoekitError, match="another corpus, split, tokenizer or loader"):
        SAMPLE_DATA.train_batches(4, 64, seed=1, stream="sequential").load_state_dict(state)
    with pytest.raises(MoekitError, match="another corpus, split, tokenizer or loader"):
        SAMPLE_DATA.train_batches(4, 64, seed=0, stream="mixed").load_state_dict(state)
    stream = SAMPLE_DATA.train_batches(4, 64, seed=0, stream="sequential")
    for damaged in (
        {**state, "walks": {"all": [0, 10**9, 0]}},
        {**state, "walks": {"all": [0, 0]}},
        {**state, "walks": {}},
        {**state, "batches": -1},
        {**state, "format": "other"},
        [],
    ):
        with pytest.raises(MoekitError, match="data state"):
            stream.load_state_dict(damaged)


def test_different_seeds_give_different_orders_and_epochs_reshuffle():
    a = next(SAMPLE_DATA.train_batches(2, 128, seed=0))
    b = next(SAMPLE_DATA.train_batches(2, 128, seed=1))
    assert not torch.equal(a.input_ids, b.input_ids)
    walk = SAMPLE_DATA.train_batches(2, 128, seed=0, stream="sequential").walks["all"]
    assert not np.array_equal(walk.order(0), walk.order(1))
    assert sorted(walk.order(0).tolist()) == sorted(walk.order(1).tolist())


def test_single_domain_batches_hold_one_domain_and_visit_them_all():
    stream = SAMPLE_DATA.train_batches(3, 64, single_domain=True, domain_sampling="uniform", seed=0)
    seen = []
    for _ in range(100):
        batch = next(stream)
        check_batch(batch, SAMPLE_DATA.tokenizer, "packed")
        labels = batch.domains[batch.token_mask].unique().tolist()
        assert len(labels) == 1
        seen.append(labels[0])
    counts = np.bincount(seen, minlength=len(SAMPLE_DATA.domains))
    assert (counts >= 8).all(), counts  # uniform over 5 domains: about 20 each


def test_leave_one_domain_out_never_trains_on_the_held_out_domain():
    data = LanguageModelData(split_corpus(load_sample(), holdout="code"), ByteTokenizer())
    label = data.domains.index("code")
    for single in (False, True):
        stream = data.train_batches(4, 256, single_domain=single)
        for _ in range(40):
            assert label not in next(stream).domains.unique().tolist()
        assert not any(name.split("/")[0] == "code" for name in stream.state_dict()["walks"])
    evaluated = list(data.eval_batches("code", "test", batch_size=4, seq_len=256))
    assert evaluated and all((b.domains[b.token_mask] == label).all() for b in evaluated)


def test_attention_mask_matches_its_definition():
    batch = next(iter(SAMPLE_DATA.eval_batches("math", "test", batch_size=2, seq_len=40, layout="packed")))
    mask = batch.attention_mask()
    rows, seq = batch.shape
    for b in range(rows):
        for q in range(seq):
            for k in range(seq):
                same = bool(batch.doc_ids[b, q] == batch.doc_ids[b, k]) and bool(batch.token_mask[b, q])
                expected = (same and k <= q) or (q == k)
                assert bool(mask[b, q, k]) == expected


def test_bpe_batches_keep_the_invariants(tmp_path):
    splits = split_corpus(load_sample())
    tokenizer = train_bpe_for(splits, 512, cache_dir=tmp_path)
    assert (tmp_path / "tokenizers").is_dir()
    assert train_bpe_for(splits, 512, cache_dir=tmp_path).to_json() == tokenizer.to_json()
    data = LanguageModelData(splits, tokenizer)
    for layout in ("packed", "padded"):
        batches = list(data.eval_batches("multilingual", "test", batch_size=4, seq_len=64, layout=layout))
        for batch in batches:
            check_batch(batch, tokenizer, layout)
        tokens, targets, domains = flatten(batches)
        check_stream_targets(tokens, targets, tokenizer)
        expected = [d.text for d in splits.documents("test", "multilingual")]
        assert [text for text, _ in documents_in_stream(tokens, domains, tokenizer)] == expected


def test_bad_loader_arguments_name_the_field():
    with pytest.raises(ConfigError, match="layout"):
        SAMPLE_DATA.train_batches(4, 64, layout="ragged")
    with pytest.raises(ConfigError, match="seq_len"):
        SAMPLE_DATA.train_batches(4, 0)
    with pytest.raises(ConfigError, match="domain_sampling"):
        SAMPLE_DATA.train_batches(4, 8, single_domain=True, domain_sampling="sometimes")
    with pytest.raises(ConfigError, match="domain"):
        list(SAMPLE_DATA.eval_batches("poetry", batch_size=2, seq_len=8))
    with pytest.raises(ConfigError, match="tokenizer"):
        prepare_data("sample", tokenizer="words")
    ints = [torch.zeros(2, 3, dtype=torch.int64) for _ in range(6)]
    with pytest.raises(MoekitError, match="Batch.targets"):
        Batch(ints[0], ints[1].float(), ints[2].bool(), *ints[3:])
    with pytest.raises(MoekitError, match="Batch.positions"):
        Batch(ints[0], ints[1], ints[2].bool(), ints[3], ints[4][:, :2], ints[5])
    with pytest.raises(MoekitError, match="Batch.token_mask"):
        Batch(*(torch.zeros(2, 3, dtype=torch.int64) for _ in range(6)))


def test_prepare_data_on_the_sample_is_ready_to_train():
    data = prepare_data("sample")
    counts = data.token_counts("train")
    assert set(counts) == set(data.domains) and all(c > 50_000 for c in counts.values())
    batch = next(data.train_batches(8, 128))
    assert batch.num_targets >= 8 * 128 - 8 * 128 // 2


def lane_streams(batches: list[Batch], lanes: int) -> list[list[Batch]]:
    """Row r of every batch comes from lane r % lanes: each lane's rows, in the order drawn."""
    per_lane: list[list[Batch]] = [[] for _ in range(lanes)]
    for batch in batches:
        for row in range(batch.shape[0]):
            one = Batch(*(getattr(batch, f)[row : row + 1] for f in Batch.__dataclass_fields__))
            per_lane[row % lanes].append(one)
    return per_lane


@given(
    st.fixed_dictionaries({"code": texts, "english": texts, "multilingual": texts}),
    st.sampled_from(["packed", "padded"]),
    st.integers(1, 6),
    st.integers(1, 48),
    st.integers(0, 3),
)
@example({"code": ["x" * 200], "english": ["é" * 50, "a"], "multilingual": ["한국어"]}, "packed", 6, 7, 0)
def test_mixed_stream_deals_every_document_to_exactly_one_lane_and_keeps_targets_correct(
    corpus_texts, layout, rows, seq, seed
):
    data = LanguageModelData(split_corpus(in_memory_corpus(corpus_texts), (1.0, 0.0, 0.0)), ByteTokenizer())
    stream = data.train_batches(rows, seq, layout=layout, seed=seed, stream="mixed")
    lanes = len(stream.walks)
    assert lanes == min(rows, len(data.splits.documents("train")))
    batches = []
    while any(state[0] == 0 for state in stream.state_dict()["walks"].values()):
        batches.append(next(stream))
        check_batch(batches[-1], data.tokenizer, layout)
    found = []
    for lane, lane_rows in zip(stream.walks.values(), lane_streams(batches, lanes), strict=True):
        tokens, targets, domains = flatten(lane_rows)
        check_stream_targets(tokens, targets, data.tokenizer)
        found += documents_in_stream(tokens, domains, data.tokenizer)[: len(lane.members)]
    expected = [(d.text, data.domains.index(d.domain)) for d in data.splits.documents("train")]
    assert sorted(found) == sorted(expected)


def test_mixed_batches_hold_many_domains_where_sequential_ones_hold_few():
    def mean_domains(stream_kind: str) -> float:
        stream = SAMPLE_DATA.train_batches(16, 256, seed=0, stream=stream_kind)
        batches = [next(stream) for _ in range(30)]
        return float(np.mean([len(b.domains[b.token_mask].unique()) for b in batches]))

    mixed, sequential = mean_domains("mixed"), mean_domains("sequential")
    assert mixed >= 3.5 and mixed > sequential + 1, (mixed, sequential)


def test_bad_stream_names_the_field():
    with pytest.raises(ConfigError, match="stream"):
        SAMPLE_DATA.train_batches(4, 64, stream="shuffled")
