"""Tokenizers round-trip any text, non-ASCII included, and BPE training is deterministic."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moekit.data.build import load_sample
from moekit.data.splits import split_corpus
from moekit.data.tokenizer import BPE_SPECIAL_TOKENS, BpeTokenizer, ByteTokenizer, train_bpe
from moekit.errors import MoekitError

SAMPLES = [
    "def f(x):\n    return x ** 2\n",
    "To be, or not to be, that is the question:",
    "Привет, мир! Как дела?",
    "吾輩は猫である。名前はまだ無い。",
    "한국어 문장, emoji 🙂 and tabs\tand NUL \x00 bytes",
    'Q: What is 3/4 + 5/6?\nA: 19/12 {"k": [1, 2.5e-3, null]}',
    "literal <|eos|> and <|pad|> are just text",
    "",
]


@pytest.fixture(scope="module")
def bpe() -> BpeTokenizer:
    splits = split_corpus(load_sample())
    return train_bpe((d.text for d in splits.documents("train")), vocab_size=600)


def test_byte_tokenizer_round_trips_and_keeps_specials_apart():
    tok = ByteTokenizer()
    assert {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258} and tok.vocab_size == 259
    for text in SAMPLES:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
        assert tok.encode_many([text])[0].tolist() == ids


@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text


def test_bpe_round_trips_the_examples_and_never_makes_specials_from_text(bpe):
    specials = {bpe.bos_id, bpe.eos_id, bpe.pad_id}
    assert specials == {0, 1, 2} and bpe.vocab_size == 600
    for text in SAMPLES:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert not specials & set(ids)
        assert bpe.encode_many([text])[0].tolist() == ids
    assert len(bpe.encode("def return self import")) < len("def return self import")  # merges learned


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_training_is_deterministic_and_saves_as_json(tmp_path, bpe):
    splits = split_corpus(load_sample())
    again = train_bpe((d.text for d in splits.documents("train")), vocab_size=600)
    assert again.to_json() == bpe.to_json() and again.fingerprint == bpe.fingerprint
    other = train_bpe((d.text for d in splits.documents("train", "code")), vocab_size=600)
    assert other.fingerprint != bpe.fingerprint
    path = tmp_path / "tok" / "bpe.json"
    bpe.save(path)
    loaded = BpeTokenizer.load(path)
    assert loaded.to_json() == bpe.to_json()
    assert all(loaded.encode(t) == bpe.encode(t) for t in SAMPLES)
    assert all(token in path.read_text() for token in BPE_SPECIAL_TOKENS)


def test_bad_tokenizer_files_and_sizes_are_reported(tmp_path):
    with pytest.raises(MoekitError, match="tokenizer file not found"):
        BpeTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MoekitError, match="bad.json: not a tokenizers JSON"):
        BpeTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(MoekitError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=100)
