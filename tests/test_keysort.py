"""The routing's grouping sort: the fast path gives exactly torch's stable sort."""

import itertools
from unittest.mock import patch

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit.routing.keysort as keysort
from moekit.routing.keysort import RADIX_KEY_LIMIT, stable_sort
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
