"""The routing's grouping sort: the counting sort and the radix sort give exactly torch's stable
sort, and the by-token runs its bincount and cumsum."""

import itertools
from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit.routing.keysort as keysort
from helpers import needs_loops
from moekit.routing.keysort import RADIX_KEY_LIMIT, key_runs, sort_cells, stable_sort
from moekit.routing.record import Assignments


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.integers(0, 9), max_size=300)
    | st.lists(st.sampled_from([0, 1, RADIX_KEY_LIMIT - 1, RADIX_KEY_LIMIT]), max_size=50)
    | st.lists(st.integers(0, 2**40), max_size=50)
)
def test_stable_sort_equals_torch_stable_sort(keys):
    """Many ties, the largest keys the fast path takes, keys past it (torch's sort), empty input;
    on the radix sort (taken here from any number of keys) and as a decode step's few keys go."""
    tensor = torch.tensor(keys, dtype=torch.int64)
    expected_values, expected_order = torch.sort(tensor, stable=True)
    for min_keys in (0, keysort.RADIX_MIN_KEYS):
        with patch.object(keysort, "RADIX_MIN_KEYS", min_keys):
            values, order = stable_sort(tensor)
        assert order.dtype == torch.int64
        assert torch.equal(values, expected_values) and torch.equal(order, expected_order)


def test_masked_tokens_are_left_out_after_the_fast_sort():
    """from_dense's sentinel for masked tokens sorts after every expert, whatever the ids."""
    for num_experts, min_keys in itertools.product((4, RADIX_KEY_LIMIT + 5), (0, keysort.RADIX_MIN_KEYS)):
        index = torch.tensor([[0, num_experts - 1], [num_experts - 1, 1], [1, 0]])
        weight = torch.rand(3, 2)
        mask = torch.tensor([True, False, True])
        with patch.object(keysort, "RADIX_MIN_KEYS", min_keys):
            chosen = Assignments.from_dense(index, weight, mask)
        pairs = list(zip(chosen.token.tolist(), chosen.expert.tolist(), strict=True))
        assert pairs == sorted([(0, 0), (2, 0), (2, 1), (0, num_experts - 1)], key=lambda p: (p[1], p[0]))


@needs_loops
@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.integers(0, 40), max_size=400), spare=st.integers(0, 3))
def test_counting_sort_and_its_runs_equal_torchs_stable_sort(keys, spare):
    """With a bound on the keys (some keys of the range absent, the bound past the largest or not)
    the counting sort runs; without the kernels, key_runs falls back to the radix or torch sort:
    both give torch's order and the runs' bounds bincount and cumsum give."""
    tensor = torch.tensor(keys, dtype=torch.int64)
    num_keys = (max(keys) + 1 if keys else 0) + spare
    expected_values, expected_order = torch.sort(tensor, stable=True)
    expected_bounds = torch.zeros(num_keys + 1, dtype=torch.int64)
    expected_bounds[1:] = torch.bincount(tensor, minlength=num_keys).cumsum(0)
    assert keysort._counts(tensor, num_keys, dim=1)
    for counting in (True, False):
        with patch.object(keysort.native, "loops_available", lambda counting=counting: counting):
            values, order = stable_sort(tensor, num_keys)
            runs_order, bounds = key_runs(tensor, num_keys)
        assert torch.equal(values, expected_values) and torch.equal(order, expected_order)
        assert torch.equal(runs_order, expected_order) and torch.equal(bounds, expected_bounds)


@needs_loops
@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(0, 60), width=st.integers(1, 9), num_keys=st.integers(1, 20), seed=st.integers(0, 2**16)
)
def test_sorted_cells_carry_their_rows_and_columns(rows, width, num_keys, seed):
    """A router's [T, k] choices sorted by expert on the counting sort and without it: torch's
    stable order of the flattened cells, and each cell's row and column (order // k, order % k),
    one row (a decode step's token) included."""
    gen = torch.Generator().manual_seed(seed)
    cells = torch.randint(0, num_keys, (rows, width), generator=gen)
    expected_values, expected_order = torch.sort(cells.reshape(-1), stable=True)
    for counting in (True, False):
        with patch.object(keysort.native, "loops_available", lambda counting=counting: counting):
            values, order, row, column = sort_cells(cells, num_keys)
        assert torch.equal(values, expected_values) and torch.equal(order, expected_order)
        assert torch.equal(row, expected_order // width) and torch.equal(column, expected_order % width)


@needs_loops
def test_keys_outside_the_bound_get_a_clear_error():
    for keys, num_keys in (([0, 3, 1], 3), ([0, -1], 2)):
        with pytest.raises(RuntimeError, match=r"keys must be in \[0, \d\), got -?\d"):
            stable_sort(torch.tensor(keys), num_keys)
        with pytest.raises(RuntimeError, match=r"keys must be in \[0, \d\), got -?\d"):
            sort_cells(torch.tensor([keys]), num_keys)


@pytest.mark.parametrize("masked", [False, True])
def test_grouping_with_the_expert_count_equals_grouping_without(masked):
    """from_dense with `num_experts` (the counting sort, a sentinel of num_experts for masked
    tokens) groups exactly as without it (the radix sort, its own sentinel)."""
    gen = torch.Generator().manual_seed(1)
    num_tokens, num_experts, k = 2000, 12, 3
    index = torch.rand(num_tokens, num_experts, generator=gen).topk(k, dim=-1).indices
    weight = torch.rand(num_tokens, k, generator=gen)
    mask = torch.rand(num_tokens, generator=gen) > 0.3 if masked else None
    with_count = Assignments.from_dense(index, weight, mask, num_experts=num_experts)
    without = Assignments.from_dense(index, weight, mask)
    for field in ("token", "expert", "weight", "rank"):
        assert torch.equal(getattr(with_count, field), getattr(without, field))
