"""Splits are by document, disjoint, complete, deterministic and per domain; leave-one-domain-out
keeps a domain out of training entirely."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moekit.data.build import load_sample
from moekit.data.corpus import Corpus, Document
from moekit.data.splits import SPLITS, split_corpus, split_counts, split_domain
from moekit.errors import ConfigError

SAMPLE = load_sample()


def test_every_document_lands_in_exactly_one_split_of_its_domain():
    splits = split_corpus(SAMPLE)
    for domain in SAMPLE.domains:
        parts = [splits.documents(split, domain) for split in SPLITS]
        ids = [d.id for part in parts for d in part]
        assert sorted(ids) == sorted(d.id for d in SAMPLE.documents[domain])
        assert len(ids) == len(set(ids))
        assert all(len(part) >= 1 for part in parts)
        assert all(d.domain == domain for part in parts for d in part)
        # roughly 90/5/5 by document count
        assert len(parts[0]) >= 0.8 * len(ids)


def test_splits_are_deterministic_and_the_seed_changes_them():
    a, b = split_corpus(SAMPLE), split_corpus(SAMPLE)
    assert all(a.documents(s, "math") == b.documents(s, "math") for s in SPLITS)
    other = split_corpus(SAMPLE, seed=1)
    assert other.documents("test", "math") != a.documents("test", "math")


def test_a_document_keeps_its_split_when_other_documents_are_removed():
    docs = SAMPLE.documents["math"]
    full = split_domain(docs, (0.8, 0.1, 0.1))
    fewer = split_domain(docs[: len(docs) // 2], (0.8, 0.1, 0.1))
    kept = {d.id for d in docs[: len(docs) // 2]}
    # rank-based cut: documents can only move toward later splits' boundaries, never swap wholesale
    test_ids = {d.id for d in full["test"]} & kept
    assert len(test_ids & {d.id for d in fewer["validation"] + fewer["test"]}) >= 0.8 * len(test_ids)


@given(
    st.integers(0, 400),
    st.sampled_from([(0.9, 0.05, 0.05), (0.8, 0.1, 0.1), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0)]),
)
def test_split_counts_add_up_and_give_every_used_split_a_document(count, fractions):
    train, validation, test = split_counts(count, fractions)
    assert train + validation + test == count and min(train, validation, test) >= 0
    if count >= 3:
        assert train >= 1
        assert (validation >= 1) == (fractions[1] > 0) and (test >= 1) == (fractions[2] > 0)


def test_leave_one_domain_out():
    splits = split_corpus(SAMPLE, holdout="multilingual")
    assert splits.training_domains == ("code", "english", "math", "structured")
    assert all(d.domain != "multilingual" for d in splits.documents("train"))
    assert any(d.domain == "multilingual" for d in splits.documents("test"))
    assert splits.documents("train", "multilingual") == split_corpus(SAMPLE).documents(
        "train", "multilingual"
    )


def test_bad_arguments_name_the_field():
    with pytest.raises(ConfigError, match="holdout"):
        split_corpus(SAMPLE, holdout="klingon")
    with pytest.raises(ConfigError, match="fractions"):
        split_corpus(SAMPLE, (0.5, 0.2, 0.2))
    with pytest.raises(ConfigError, match="fractions"):
        split_corpus(SAMPLE, (0.9, 0.1))
    with pytest.raises(ConfigError, match="split"):
        split_corpus(SAMPLE).documents("dev")
    one = Corpus("one", {"domains": []}, {"math": SAMPLE.documents["math"][:5]})
    with pytest.raises(ConfigError, match="at least two domains"):
        split_corpus(one, holdout="math")


def test_small_domains_keep_what_they_have():
    docs = tuple(Document(f"code/x/{i}", "code", "pass") for i in range(2))
    assert [len(p) for p in split_domain(docs, (0.9, 0.05, 0.05)).values()] == [2, 0, 0]
