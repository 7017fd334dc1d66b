"""The mixture training stream of the data experiments: each batch holds every domain's share of
its rows rounded down or up, it is deterministic, and bad weights are refused in one line."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.data.lmdata import prepare_data
from moekit.errors import ConfigError
from moekit.experiments.mixture import MixtureData


@pytest.fixture(scope="module")
def base():
    return prepare_data("sample", log=lambda _: None)


def row_domains(data, batch) -> list[str]:
    """The domain of each row, read from the batch's own token labels."""
    names = []
    for row in batch.domains.tolist():
        labels = {x for x in row if x >= 0}
        assert len(labels) == 1  # a row comes from one domain's lane
        names.append(data.domains[labels.pop()])
    return names


@settings(deadline=None, max_examples=8)
@given(st.lists(st.integers(0, 20), min_size=5, max_size=5).filter(lambda w: sum(w) > 0), st.integers(3, 12))
def test_every_batch_holds_each_domains_share_rounded(base, raw, batch_size):
    weights = {d: w / sum(raw) for d, w in zip(base.domains, raw, strict=True)}
    data = MixtureData(base, weights)
    stream = data.train_batches(batch_size, 32, seed=3)
    totals = dict.fromkeys(base.domains, 0)
    for _ in range(6):
        rows = row_domains(data, next(stream))
        for domain in base.domains:
            count = rows.count(domain)
            share = weights[domain] * batch_size
            assert np.floor(share) - 1e-9 <= count <= np.ceil(share) + 1e-9, (domain, count, share)
            totals[domain] += count
    for domain, w in weights.items():
        if w == 0:
            assert totals[domain] == 0


def test_the_stream_is_deterministic_and_seeded(base):
    weights = {"code": 0.5, "math": 0.3, "english": 0.2}

    def first(seed):
        stream = MixtureData(base, weights).train_batches(7, 32, seed=seed)
        return [next(stream).input_ids for _ in range(3)]

    a, b, c = first(0), first(0), first(1)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert any((x != z).any() for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"poetry": 1.0}, "poetry"),
        ({"code": 0.5, "math": 0.4}, "summing to 1"),
        ({"code": 1.5, "math": -0.5}, ">= 0"),
        ({"code": float("nan"), "math": 1.0}, "summing to 1"),
    ],
)
def test_bad_weights_are_refused_in_one_line(base, weights, message):
    with pytest.raises(ConfigError, match=message) as error:
        MixtureData(base, weights)
    assert "\n" not in str(error.value) and "mixture" in str(error.value)
