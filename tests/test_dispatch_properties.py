"""Property tests for routing and dispatch invariants: empty experts, one hot expert, drops, masks;
and every expert path (`dispatch.grouped`: native, decode, portable) against float64."""

from contextlib import contextmanager
from unittest.mock import patch

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit.dispatch.grouped as grouped_module
from moekit.dispatch import bandwidth
from moekit.dispatch.bandwidth import torch_threads
from moekit.dispatch.grouped import ExpertGroups, grouped_experts, grouped_mm_available
from moekit.experts.activations import make_activation
from moekit.kernels.native import native_available
from moekit.routing.capacity import apply_capacity, expert_capacity, priority_key
from moekit.routing.record import Assignments
from moekit.routing.spec import RouterSpec
from moekit.routing.token_choice import TokenChoiceRouter

needs_native = pytest.mark.skipif(
    not native_available(),
    reason="the native and decode paths need an AVX-512 CPU and a C++ compiler; without them every "
    "call takes the portable path, which the float64 tests here cover",
)


@st.composite
def routing_problems(draw):
    num_tokens = draw(st.integers(1, 24))
    num_experts = draw(st.integers(1, 9))
    k = draw(st.integers(1, num_experts))
    skew = draw(st.sampled_from(["uniform", "one_expert", "two_experts"]))
    seed = draw(st.integers(0, 2**16))
    mask_kind = draw(st.sampled_from(["none", "random", "all_masked"]))
    capacity_factor = draw(st.sampled_from([None, 0.25, 0.5, 1.0, 2.0]))
    policy = draw(st.sampled_from(["position", "score", "random"]))
    return num_tokens, num_experts, k, skew, seed, mask_kind, capacity_factor, policy


def _route(problem):
    num_tokens, num_experts, k, skew, seed, mask_kind, capacity_factor, policy = problem
    gen = torch.Generator().manual_seed(seed)
    spec = RouterSpec(num_experts=num_experts, top_k=k, capacity_factor=capacity_factor, drop_policy=policy)
    router = TokenChoiceRouter(8, spec)
    x = torch.randn(num_tokens, 8, generator=gen)
    with torch.no_grad():
        router.weight.normal_(generator=gen)
        if skew != "uniform":  # make one or two experts win every token
            router.weight[: 1 if skew == "one_expert" else 2] = 0
            x[:, 0] = 0
            router.weight[: 1 if skew == "one_expert" else 2, 0] = 100.0
            x = x.abs()
            router.weight[:, 1:] = router.weight[:, 1:] * 0.01
            router.weight[: 1 if skew == "one_expert" else 2, 1:] = 1.0
    mask = None
    if mask_kind == "random":
        mask = torch.rand(num_tokens, generator=gen) > 0.4
    elif mask_kind == "all_masked":
        mask = torch.zeros(num_tokens, dtype=torch.bool)
    return router(x, mask, generator=gen), spec, x, mask


@given(routing_problems())
def test_counts_add_up_and_capacity_holds(problem):
    routing, spec, x, mask = _route(problem)
    num_real = int(routing.token_mask.sum())
    chosen = routing.chosen_counts
    assert int(chosen.sum()) == num_real * spec.top_k
    assert int(routing.counts.sum()) == len(routing.kept)
    assert torch.equal(chosen, routing.counts + routing.dropped.counts(spec.num_experts))
    # every token's k choices are distinct experts and each appears exactly once (kept or dropped)
    pairs = list(zip(routing.kept.token.tolist(), routing.kept.expert.tolist(), strict=True))
    pairs += list(zip(routing.dropped.token.tolist(), routing.dropped.expert.tolist(), strict=True))
    assert len(pairs) == len(set(pairs))
    assert torch.all(routing.kept.expert[1:] >= routing.kept.expert[:-1])
    # padding gets nothing
    real = set(torch.nonzero(routing.token_mask).flatten().tolist())
    assert {t for t, _ in pairs} <= real
    if spec.capacity_factor is None:
        assert len(routing.dropped) == 0
    else:
        cap = expert_capacity(num_real * spec.top_k, spec.num_experts, spec.capacity_factor)
        assert all(c <= cap for c in routing.counts.tolist())
        # an expert drops only once it is full
        full = routing.counts == cap
        assert all(full[routing.dropped.expert].tolist())


@given(routing_problems())
def test_position_and_score_policies_keep_the_best_keys(problem):
    routing, spec, _, _ = _route(problem)
    if spec.capacity_factor is None or spec.drop_policy == "random" or len(routing.dropped) == 0:
        return
    num_tokens = routing.num_tokens
    kept_key = priority_key(routing.kept, spec.drop_policy, num_tokens)
    dropped_key = priority_key(routing.dropped, spec.drop_policy, num_tokens)
    for e in routing.dropped.expert.unique().tolist():
        worst_kept = kept_key[routing.kept.expert == e].max()
        best_dropped = dropped_key[routing.dropped.expert == e].min()
        assert worst_kept <= best_dropped


@st.composite
def assignment_sets(draw):
    num_tokens = draw(st.integers(1, 12))
    num_experts = draw(st.integers(1, 6))
    layout = draw(st.sampled_from(["random", "all_on_one", "empty", "some_empty"]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    pairs = set()
    if layout == "all_on_one":
        e = int(torch.randint(num_experts, (1,), generator=gen))
        pairs = {(t, e) for t in range(num_tokens)}
    elif layout != "empty":
        allowed = list(range(num_experts)) if layout == "random" else list(range(0, num_experts, 2))
        for t in range(num_tokens):
            for e in allowed:
                if torch.rand(1, generator=gen) < 0.5:
                    pairs.add((t, e))
    pairs = sorted(pairs, key=lambda p: (p[1], p[0]))
    return num_tokens, num_experts, pairs, seed


@given(
    assignment_sets(),
    st.sampled_from(["swiglu", "gelu", "relu2", "clamped_swiglu"]),
    st.sampled_from(["output", "input"]),
    st.booleans(),
)
def test_every_kept_assignment_is_computed_exactly_once(case, act_name, weight_on, bias):
    """The layer's arithmetic (gather, routing weight, combine and their gradients), in float64 on
    the portable path, against a per-assignment loop."""
    num_tokens, num_experts, pairs, seed = case
    gen = torch.Generator().manual_seed(seed)
    hidden, ff = 5, 3
    act = make_activation(act_name)
    token = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    expert = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    weight = torch.rand(len(pairs), dtype=torch.float64, generator=gen).requires_grad_()
    x = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen).requires_grad_()
    w_in = torch.randn(
        num_experts, act.in_features(ff), hidden, dtype=torch.float64, generator=gen
    ).requires_grad_()
    w_out = torch.randn(num_experts, hidden, ff, dtype=torch.float64, generator=gen).requires_grad_()
    b_in = (
        torch.randn(num_experts, act.in_features(ff), dtype=torch.float64, generator=gen).requires_grad_()
        if bias
        else None
    )
    b_out = (
        torch.randn(num_experts, hidden, dtype=torch.float64, generator=gen).requires_grad_()
        if bias
        else None
    )
    upstream = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen)
    leaves = [t for t in (x, weight, w_in, w_out, b_in, b_out) if t is not None]
    y = grouped_experts(x, token, expert, weight, w_in, w_out, b_in, b_out, act, weight_on, backend="loop")
    grads = torch.autograd.grad((y * upstream).sum(), leaves, allow_unused=False)

    expected = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for i, (t, e) in enumerate(pairs):
        xin = x[t] * weight[i] if weight_on == "input" else x[t]
        h = w_in[e] @ xin + (b_in[e] if bias else 0)
        out = w_out[e] @ act.forward(h.unsqueeze(0)).squeeze(0) + (b_out[e] if bias else 0)
        expected = expected.index_add(
            0, torch.tensor([t]), (out * weight[i] if weight_on == "output" else out)[None]
        )
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    if pairs:
        expected_grads = torch.autograd.grad((expected * upstream).sum(), leaves, allow_unused=True)
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(
                got, torch.zeros_like(got) if want is None else want, rtol=1e-10, atol=1e-12
            )
    else:
        assert all(torch.count_nonzero(g) == 0 for g in grads)
    # experts that received nothing get an exactly-zero weight gradient
    used = set(expert.tolist())
    for e in range(num_experts):
        if e not in used:
            assert torch.count_nonzero(grads[2][e]) == 0 and torch.count_nonzero(grads[3][e]) == 0


def test_apply_capacity_on_empty_assignments():
    empty = Assignments.empty()
    kept, dropped = apply_capacity(empty, 4, 3, 1, "position")
    assert len(kept) == 0 and len(dropped) == 0


def sorted_topk_assignments(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, expert) for each token's top-k experts, sorted by expert as dispatch expects."""
    expert = torch.topk(logits, k).indices.reshape(-1)
    expert, order = expert.sort(stable=True)
    return torch.arange(logits.shape[0]).repeat_interleave(k)[order], expert


@contextmanager
def split_reads(faster: bool):
    """Decode's measured choice of threads, as if split reads were (not) faster here."""
    with patch.object(bandwidth, "parallel_reads_pay_off", lambda threads: faster):
        yield


def expert_case(gen, num_tokens, num_experts, k, hidden, ff, act, bias, empty_expert=None):
    """(token, expert, float64 leaves [x, weight, w_in, w_out, (b_in, b_out)], upstream)."""
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if empty_expert is not None:
        logits[:, empty_expert] = -float("inf")
    token, expert = sorted_topk_assignments(logits, k)
    exact = [
        torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen),
        torch.rand(len(token), dtype=torch.float64, generator=gen),
        torch.randn(num_experts, act.in_features(ff), hidden, dtype=torch.float64, generator=gen) * 0.2,
        torch.randn(num_experts, hidden, ff, dtype=torch.float64, generator=gen) * 0.2,
    ]
    if bias:
        exact.append(torch.randn(num_experts, act.in_features(ff), dtype=torch.float64, generator=gen))
        exact.append(torch.randn(num_experts, hidden, dtype=torch.float64, generator=gen))
    upstream = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen)
    return token, expert, exact, upstream


def run_experts(token, expert, exact, upstream, act, weight_on, dtype, backend="auto"):
    """(plan, output, gradients of every leaf) of the grouped experts on `exact` cast to `dtype`."""
    leaves = [t.to(dtype).requires_grad_() for t in exact]
    x, weight, w_in, w_out, *biases = leaves
    b_in, b_out = biases if biases else (None, None)
    plan = grouped_module.plan_experts(x, token, expert, w_in, w_out, act, weight_on, backend)
    y = grouped_experts(x, token, expert, weight, w_in, w_out, b_in, b_out, act, weight_on, backend)
    return plan, (y, *torch.autograd.grad((y * upstream.to(dtype)).sum(), leaves))


@pytest.mark.parametrize("act_name", ["swiglu", "gelu"])
@pytest.mark.parametrize("weight_on", ["output", "input"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("num_tokens", [400, 3])
def test_every_path_matches_float64_for_every_expert_kind(act_name, weight_on, bias, threads, num_tokens):
    """fp32 on `auto`: 400 tokens take the native path (every expert whole on one of the threads),
    3 tokens the decode path (one or two rows per expert: the kernel's dot products), on one
    thread or two; without the native kernel, the portable path. Output and every gradient
    against float64, and an expert without rows gets an exactly-zero weight gradient."""
    gen = torch.Generator().manual_seed(8)
    act = make_activation(act_name)
    token, expert, exact, upstream = expert_case(gen, num_tokens, 6, 2, 24, 20, act, bias, empty_expert=3)
    with torch_threads(threads), split_reads(True):
        _, want = run_experts(token, expert, exact, upstream, act, weight_on, torch.float64)
        plan, got = run_experts(token, expert, exact, upstream, act, weight_on, torch.float32)
    if native_available():
        assert plan.path == ("native" if num_tokens == 400 else "decode")
        assert plan.products.threads == threads
        whole = act_name == "swiglu" and weight_on == "output" and not bias  # in one C++ call
        assert plan.whole_swiglu(*([torch.ones(1)] * 2 if bias else [None, None])) == whole
    else:
        assert plan.path == "portable"
    for fast, exact_value in zip(got, want, strict=True):
        torch.testing.assert_close(fast.double(), exact_value, rtol=1e-4, atol=1e-4)
    for grad in got[3:5]:
        assert torch.count_nonzero(grad[3]) == 0


@pytest.mark.parametrize("backend", ["auto", "loop", "grouped_mm"])
def test_large_experts_match_float64(backend):
    """Experts of many rows (one past 1024, kernel blocks of 256 and panels of 64 with ragged
    tails, one empty) on every path `backend` selects, two threads: output and every gradient
    against float64."""
    if backend == "grouped_mm" and not grouped_mm_available():
        pytest.skip("torch.nn.functional.grouped_mm needs torch >= 2.9")
    gen = torch.Generator().manual_seed(4)
    num_tokens, num_experts, k, hidden, ff = 1500, 6, 2, 272, 72
    act = make_activation("swiglu")
    token, expert, exact, upstream = expert_case(gen, num_tokens, num_experts, k, hidden, ff, act, False, 5)
    counts = torch.bincount(expert, minlength=num_experts)
    assert counts.max() > 256 and counts[5] == 0
    with torch_threads(2):
        _, want = run_experts(token, expert, exact, upstream, act, "output", torch.float64)
        plan, got = run_experts(token, expert, exact, upstream, act, "output", torch.float32, backend)
    assert plan.path == ("native" if backend == "auto" and native_available() else "portable")
    for fast, exact_value in zip(got, want, strict=True):
        torch.testing.assert_close(fast.double(), exact_value, rtol=2e-4, atol=2e-4)
    for grad in got[3:]:
        assert torch.count_nonzero(grad[5]) == 0


@needs_native
@pytest.mark.parametrize("num_tokens", [700, 3])
def test_native_paths_are_bitwise_deterministic_whatever_the_threads(num_tokens):
    """Threads take experts as they come, but each expert is computed by one thread in one way
    and each token's combine by one thread in a fixed order: runs agree bit for bit, on one
    thread or two (training runs repeat, and resume on other loads)."""
    gen = torch.Generator().manual_seed(6)
    act = make_activation("swiglu")
    token, expert, exact, upstream = expert_case(gen, num_tokens, 12, 4, 32, 24, act, False)  # k > 2
    runs = []
    for threads in (2, 2, 1):
        with torch_threads(threads), split_reads(True):
            runs.append(run_experts(token, expert, exact, upstream, act, "output", torch.float32)[1])
    for again in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], again, strict=True))


@needs_native
@given(st.lists(st.integers(0, 9), min_size=1, max_size=40), st.integers(1, 5), st.integers(0, 2**16))
def test_combine_sums_each_tokens_rows_as_a_serial_index_add(tokens, num_tokens, seed):
    """The native combine (`moekit::combine_rows`): each token's rows summed in assignment order,
    so bit for bit what a serial index_add_ gives, tokens without rows 0."""
    token = torch.tensor([t % num_tokens for t in tokens])
    rows = torch.randn(len(token), 37, generator=torch.Generator().manual_seed(seed))
    groups = ExpertGroups.build(token, torch.zeros_like(token), 1, num_tokens)
    native = grouped_module.NativeProducts(groups, "native", 2)
    with torch_threads(1):
        expected = torch.zeros(num_tokens, 37).index_add_(0, token, rows)
    with torch_threads(2):
        assert torch.equal(native.combine(rows), expected)


@needs_native
@pytest.mark.parametrize("faster", [True, False])
def test_decode_takes_the_threads_split_reads_were_measured_to_pay_for(faster):
    """`auto` at decode: the native kernel's dot products, on all threads where split memory reads
    were measured faster than one thread's on this CPU, else on the calling thread; portable
    for float64 and where `backend` asks for torch's kernels."""
    gen = torch.Generator().manual_seed(9)
    token, expert = sorted_topk_assignments(torch.randn(3, 6, generator=gen), 2)
    act = make_activation("swiglu")
    x, w_in, w_out = torch.randn(3, 16), torch.randn(6, 16, 16), torch.randn(6, 16, 8)
    with torch_threads(2), split_reads(faster):
        plan = grouped_module.plan_experts(x, token, expert, w_in, w_out, act)
        assert plan.path == "decode" and plan.products.threads == (2 if faster else 1)
        torch_kernels = grouped_module.plan_experts(x, token, expert, w_in, w_out, act, backend="loop")
        assert torch_kernels.path == "portable"
        exact = grouped_module.plan_experts(x.double(), token, expert, w_in.double(), w_out.double(), act)
        assert exact.path == "portable"


def test_native_kernel_off_takes_the_portable_path(monkeypatch):
    """`MOEKIT_NATIVE=0` (the one switch, for debugging and the portable test leg) forces the
    portable path."""
    monkeypatch.setenv("MOEKIT_NATIVE", "0")
    token, expert = sorted_topk_assignments(torch.randn(64, 4, generator=torch.Generator().manual_seed(2)), 2)
    act = make_activation("swiglu")
    plan = grouped_module.plan_experts(torch.randn(64, 16), token, expert, torch.randn(4, 16, 16),
                                       torch.randn(4, 16, 8), act)  # fmt: skip
    assert plan.path == "portable"
