"""moekit's top-k kernel (`kernels/topk.py`, `csrc/topk_rows.cpp`): torch.topk's indices on every
row, the rows with ties or NaN flagged and left to torch.topk, and routers that use it unchanged."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import needs_loops, torch_threads
from moekit.kernels import topk
from moekit.routing.spec import preset
from moekit.routing.token_choice import choose_topk

pytestmark = [needs_loops, pytest.mark.other_vector_set]


@st.composite
def score_rows(draw):
    """Scores [T, n] and k: continuous values, or few distinct values (ties everywhere), with
    NaN, +-inf and signed zeros sprinkled in."""
    rows, width = draw(st.integers(0, 40)), draw(st.integers(1, 70))
    k = draw(st.integers(1, width))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scores = torch.randn(rows, width, generator=gen)
    if draw(st.booleans()):
        scores = (scores * 2).round()
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    for _ in range(draw(st.integers(0, 6))):
        if rows:
            r, c = draw(st.integers(0, rows - 1)), draw(st.integers(0, width - 1))
            scores[r, c] = specials[draw(st.integers(0, len(specials) - 1))]
    return scores, k


@settings(max_examples=150, deadline=None)
@given(case=score_rows(), threads=st.sampled_from([1, 2]))
def test_the_kernel_gives_torch_topks_indices_on_every_row(case, threads):
    scores, k = case
    with torch_threads(threads):
        got = topk.kernel_topk_indices(scores, k)
    assert torch.equal(got, scores.topk(k, dim=-1).indices)


def test_rows_of_distinct_scores_are_not_flagged_and_ties_are():
    """The kernel answers every row of distinct scores itself (it is not torch.topk every time),
    and flags exactly the rows with a tie among or at the edge of their top k, or a NaN."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 128, generator=gen).softmax(-1)
    with torch_threads(2):
        index, flagged = torch.ops.moekit.topk_rows(scores, 8)
    assert not flagged.any()
    assert torch.equal(index, scores.topk(8, dim=-1).indices)
    ranked = scores.sort(dim=-1, descending=True)
    tied = scores.clone()
    tied[0, ranked.indices[0, 7]] = ranked.values[0, 8]  # the 8th and 9th equal: the edge
    tied[1, ranked.indices[1, 3]] = ranked.values[1, 2]  # two equal within the top 8
    tied[2, ranked.indices[2, 100]] = ranked.values[2, 50]  # equal values below the top 8: fine
    tied[3, 5] = float("nan")
    _, flagged = torch.ops.moekit.topk_rows(tied, 8)
    assert flagged[:4].tolist() == [True, True, False, True] and not flagged[4:].any()


def test_bad_arguments_get_a_clear_error():
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.moekit.topk_rows(torch.randn(4, 8), 9)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.moekit.topk_rows(torch.randn(8, 4).t(), 2)


@pytest.mark.parametrize(
    "score_fn, timing", [("softmax", "before_topk"), ("softmax", "after_topk"), ("sigmoid", "before_topk")]
)
def test_routers_choose_and_differentiate_as_with_torch_topk(score_fn, timing, monkeypatch):
    """choose_topk on the kernel (large enough for it) against choose_topk on torch.topk: the same
    experts, weights and logits' gradient, bit for bit."""
    spec = replace(preset("qwen3_moe", 64, 6), score_fn=score_fn, score_timing=timing)
    logits = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(256, 6, generator=torch.Generator().manual_seed(2))
    results = []
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(topk, "MIN_ROWS", 10**9)
        leaf = logits.clone().requires_grad_()
        scores, index, weights = choose_topk(leaf, spec, None)
        (grad,) = torch.autograd.grad((weights * upstream).sum(), leaf)
        results.append((index, weights, grad))
    assert topk.fits(logits, 6) and logits.shape[0] >= 64  # the first run was on the kernel
    for fast, reference in zip(*results, strict=True):
        assert torch.equal(fast, reference)
