"""Property tests for routing and dispatch invariants: empty experts, one hot expert, drops, masks."""

import os
import threading
from contextlib import contextmanager
from unittest.mock import patch

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit.dispatch.grouped as grouped_module
from helpers import torch_threads
from moekit.dispatch.grouped import ExpertGroups, grouped_experts, grouped_mm_available
from moekit.dispatch.loops import backward_pairs_into, expert_loops, products_into
from moekit.dispatch.workers import for_each_expert, for_each_run
from moekit.experts.activations import make_activation
from moekit.kernels.gemm import CHUNK_ROWS
from moekit.kernels.native import native_available
from moekit.routing.capacity import apply_capacity, expert_capacity, priority_key
from moekit.routing.record import Assignments
from moekit.routing.spec import RouterSpec
from moekit.routing.token_choice import TokenChoiceRouter

EXPERT_PATHS = ("serial", "workers", "workers_python", "fused")
# fp32 on the worker paths runs moekit's own kernel where it is built; these run the library kernels
LIBRARY_KERNEL_PATHS = ("workers_library", "fused_library")


@contextmanager
def expert_path(path: str):
    """The loop backend's paths: `serial`, `workers` (experts taken whole by torch's threads in
    the native kernel's C++ loops; where it does not run, runs of experts on the Python workers,
    the loops over them compiled), `workers_python` (those loops run as Python, as where
    TorchScript is missing) and `fused` (each expert's whole forward and backward one task on the
    workers, forced on whatever the expert size; the native kernel runs its experts whole
    anyway); `*_library`: the same with moekit's own kernel turned off. Yields the
    `parallel_workers` flag for `grouped_experts`."""
    min_seconds = 0.0 if path.startswith("fused") else float("inf")
    loops = "python" if path == "workers_python" else "compiled"
    native = "0" if path.endswith("_library") else "1"
    with (
        patch.object(grouped_module, "MIN_FUSED_EXPERT_SECONDS", min_seconds),
        patch.dict(os.environ, {"MOEKIT_LOOPS": loops, "MOEKIT_NATIVE": native}),
    ):
        yield path != "serial"


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
    st.sampled_from(EXPERT_PATHS),
)
def test_every_kept_assignment_is_computed_exactly_once(case, act_name, weight_on, bias, path):
    """On every path of the loop backend (serial, per-expert workers, whole-expert tasks),
    whatever the machine would choose."""
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
    with expert_path(path) as parallel_workers:
        y = grouped_experts(
            x,
            token,
            expert,
            weight,
            w_in,
            w_out,
            b_in,
            b_out,
            act,
            weight_on,
            backend="loop",
            parallel_workers=parallel_workers,
        )
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


def swiglu_inputs(
    gen, num_tokens, num_assignments, num_experts, hidden, ff, weight_scale, dtype=torch.float64
):
    """(x, routing weights, w_in, w_out) for packed SwiGLU experts."""
    return (
        torch.randn(num_tokens, hidden, dtype=dtype, generator=gen),
        torch.rand(num_assignments, dtype=dtype, generator=gen),
        torch.randn(num_experts, 2 * ff, hidden, dtype=dtype, generator=gen) * weight_scale,
        torch.randn(num_experts, hidden, ff, dtype=dtype, generator=gen) * weight_scale,
    )


def swiglu_output_and_grads(inputs, token, expert, upstream, dtype, **options):
    """The grouped SwiGLU experts' output on `inputs` cast to `dtype`, and the gradients of x, the
    routing weights, w_in and w_out for the upstream gradient `upstream`."""
    x, weight, w_in, w_out = (t.detach().to(dtype).requires_grad_() for t in inputs)
    act = make_activation("swiglu")
    y = grouped_experts(x, token, expert, weight, w_in, w_out, None, None, act, **options)
    return (y, *torch.autograd.grad((y * upstream.to(dtype)).sum(), (x, weight, w_in, w_out)))


@pytest.mark.parametrize("path", ["workers", "workers_python", "fused"])
def test_parallel_expert_workers_match_the_serial_loop(path):
    """The worker paths (experts on single-threaded workers; with `fused`, each expert's whole
    forward and backward as one task) compute the same thing as the serial loop."""
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_experts, k, hidden, ff = 300, 6, 2, 8, 5
    token, expert = sorted_topk_assignments(torch.randn(num_tokens, num_experts, generator=gen), k)
    inputs = swiglu_inputs(gen, num_tokens, len(token), num_experts, hidden, ff, weight_scale=1.0)
    upstream = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen)
    results = []
    with torch_threads(2):
        for run_path in ("serial", path):
            with expert_path(run_path) as parallel:
                results.append(
                    swiglu_output_and_grads(
                        inputs,
                        token,
                        expert,
                        upstream,
                        torch.float64,
                        backend="loop",
                        parallel_workers=parallel,
                    )
                )
    for serial, parallel in zip(*results, strict=True):
        torch.testing.assert_close(parallel, serial, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", EXPERT_PATHS + LIBRARY_KERNEL_PATHS)
def test_float32_kernel_path_matches_float64(path):
    """fp32 experts big enough for the GEMM kernel's chunked, row-bucketed products (one expert
    past CHUNK_ROWS rows, ragged tails, one expert empty), on the serial loop and on the workers:
    the output and every gradient close to the same computation in float64 (itself held to the
    per-assignment reference above)."""
    gen = torch.Generator().manual_seed(4)
    num_tokens, num_experts, k, hidden, ff = 1500, 6, 2, 32, 24
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, 0] += 4.0  # expert 0 is in almost every token's top-2
    logits[:, 5] = -float("inf")  # expert 5 receives nothing
    token, expert = sorted_topk_assignments(logits, k)
    counts = torch.bincount(expert, minlength=num_experts)
    assert counts[0] > CHUNK_ROWS and counts[5] == 0
    inputs = swiglu_inputs(gen, num_tokens, len(token), num_experts, hidden, ff, weight_scale=0.2)
    upstream = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen)
    results = {}
    with torch_threads(2), expert_path(path) as parallel:
        for dtype in (torch.float64, torch.float32):
            results[dtype] = swiglu_output_and_grads(
                inputs, token, expert, upstream, dtype, backend="loop", parallel_workers=parallel
            )
    for fast, exact in zip(results[torch.float32], results[torch.float64], strict=True):
        torch.testing.assert_close(fast.double(), exact, rtol=1e-4, atol=1e-4)
    for grad in results[torch.float32][3:]:
        assert torch.count_nonzero(grad[5]) == 0


@given(st.lists(st.integers(0, 6), min_size=1, max_size=12), st.integers(1, 4))
def test_expert_shares_partition_experts_and_rows(counts, parts):
    """Shares (one grouped_mm call per worker) cover every expert and every row exactly once, in
    order, with grouped_mm offsets that match each expert's rows (empty experts included), and
    split the rows about evenly."""
    expert = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    groups = ExpertGroups.build(torch.arange(len(expert)), expert, len(counts))
    shares = groups.shares(parts)
    assert 1 <= len(shares) <= parts
    assert shares[0].first == 0 and shares[-1].stop == len(counts)
    assert shares[0].row_start == 0 and shares[-1].row_stop == len(expert)
    for before, after in zip(shares, shares[1:], strict=False):
        assert before.stop == after.first and before.row_stop == after.row_start
    for share in shares:
        sizes = [counts[e] for e in range(share.first, share.stop)]
        ends = torch.tensor(sizes).cumsum(0).to(torch.int32)
        assert torch.equal(share.grouped_mm_offsets, ends)
        assert share.row_stop - share.row_start == sum(sizes)
        # balanced: no share holds more than its part of the rows plus one expert's
        assert share.row_stop - share.row_start <= sum(counts) / parts + max(counts)
    if parts == 2 and sum(c > 0 for c in counts) >= 2:
        # each expert goes where its middle row falls: two shares, cut within half an expert of
        # the middle row
        assert len(shares) == 2
        assert abs(shares[1].row_start - sum(counts) / 2) <= max(counts) / 2


@pytest.mark.skipif(not grouped_mm_available(), reason="torch.nn.functional.grouped_mm needs torch >= 2.9")
@pytest.mark.parametrize("weight_on", ["output", "input"])
def test_grouped_mm_shares_on_workers_match_float64(monkeypatch, weight_on):
    """Decode-sized inputs on the grouped_mm backend split into one call per worker, each over a
    share of the experts (fp32): output and every gradient close to the float64 loop, and experts
    without rows (some at the share boundaries) get an exactly-zero weight gradient."""
    gen = torch.Generator().manual_seed(5)
    num_tokens, num_experts, k, hidden, ff = 5, 16, 2, 16, 8
    token, expert = sorted_topk_assignments(torch.randn(num_tokens, num_experts, generator=gen), k)
    inputs = swiglu_inputs(gen, num_tokens, len(token), num_experts, hidden, ff, weight_scale=0.3)
    upstream = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen)
    shares_run = []
    real_run_shares = grouped_module.run_shares
    monkeypatch.setattr(
        grouped_module,
        "run_shares",
        lambda shares, fn: (shares_run.append(len(shares)), real_run_shares(shares, fn)),
    )
    results = {}
    with torch_threads(2):
        for dtype, backend in ((torch.float64, "loop"), (torch.float32, "grouped_mm")):
            results[dtype] = swiglu_output_and_grads(
                inputs,
                token,
                expert,
                upstream,
                dtype,
                weight_on=weight_on,
                backend=backend,
                parallel_workers=True,
            )
    assert shares_run and all(count == 2 for count in shares_run)  # forward and backward, 2 workers
    for fast, exact in zip(results[torch.float32], results[torch.float64], strict=True):
        torch.testing.assert_close(fast.double(), exact, rtol=1e-5, atol=1e-5)
    unused = sorted(set(range(num_experts)) - set(expert.tolist()))
    assert unused
    for grad in results[torch.float32][3:]:
        assert torch.count_nonzero(grad[unused]) == 0


def _consecutive_slices(sizes: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) for experts of these row counts, laid out one after the other."""
    items = []
    for e, size in enumerate(sizes):
        start = items[-1][2] if items else 0
        items.append((e, start, start + size))
    return items


@given(st.lists(st.integers(0, 50), min_size=0, max_size=20))
def test_workers_take_every_expert_exactly_once(sizes):
    """The dynamic hand-out of experts to the calling thread and its helper: every expert slice
    is run exactly once, whatever the sizes (empty, one, many, all equal)."""
    items = _consecutive_slices(sizes)
    seen = []
    lock = threading.Lock()

    def record(e, start, stop):
        with lock:
            seen.append((e, start, stop))

    with torch_threads(2):
        for_each_expert(items, record, parallel=True)
    assert sorted(seen) == items


@given(st.lists(st.integers(0, 50), min_size=0, max_size=20), st.booleans())
def test_runs_of_experts_cover_every_expert_exactly_once(sizes, parallel):
    """The runs handed to the compiled loops: consecutive experts, every one in exactly one run."""
    items = _consecutive_slices(sizes)
    runs = []
    lock = threading.Lock()

    def record(run):
        with lock:
            runs.append(list(run))

    with torch_threads(2):
        for_each_run(items, record, parallel=parallel)
    assert sorted(item for run in runs for item in run) == items
    for run in runs:
        assert [e for e, _, _ in run] == list(range(run[0][0], run[0][0] + len(run)))
    assert parallel or len(runs) == (1 if items else 0)


@pytest.mark.skipif(not native_available(), reason="the native kernel needs an AVX-512 CPU and a compiler")
@pytest.mark.parametrize("reads_pay_off", [True, False])
def test_decode_takes_the_native_kernel_where_it_runs(reads_pay_off):
    """`auto` at decode: the native loops where they run (fp32), on the caller's threads where the
    experts' reads are long enough to pay the hand-off, else on the calling thread; grouped_mm
    with the workers off, the library kernels for float64."""
    gen = torch.Generator().manual_seed(9)
    token, expert = sorted_topk_assignments(torch.randn(3, 6, generator=gen), 2)
    act = make_activation("swiglu")
    x, _, w_in, w_out = swiglu_inputs(gen, 3, len(token), 6, 16, 8, 1.0, torch.float32)
    with (
        torch_threads(2),
        patch.object(grouped_module, "workers_enabled", lambda: True),
        patch.object(grouped_module, "shares_pay_off", lambda *estimate: reads_pay_off),
    ):
        plan = grouped_module.plan_experts(x, token, expert, w_in, w_out, act)
        assert plan.backend == "loop" and plan.native and plan.swiglu_loops
        assert plan.parallel == reads_pay_off and plan.single_threaded != reads_pay_off
        serial = grouped_module.plan_experts(x, token, expert, w_in, w_out, act, parallel_workers=False)
        assert serial.backend == "grouped_mm" and not serial.native
        exact = grouped_module.plan_experts(x.double(), token, expert, w_in.double(), w_out.double(), act)
        assert not exact.native  # float64: grouped_mm does not take it either, the library loop does


@pytest.mark.parametrize("reads_pay_off", [True, False])
def test_decode_on_the_library_kernels_never_takes_the_workers(reads_pay_off):
    """Decode on the library kernels (the native kernel off): grouped_mm in one call, on the
    caller's threads where the experts' reads pay the hand-off, else on one; never the expert
    workers, whose threads would not share the caller's inference mode."""
    gen = torch.Generator().manual_seed(9)
    token, expert = sorted_topk_assignments(torch.randn(3, 6, generator=gen), 2)
    act = make_activation("swiglu")
    x, _, w_in, w_out = swiglu_inputs(gen, 3, len(token), 6, 16, 8, 1.0, torch.float32)
    with (
        torch_threads(2),
        patch.object(grouped_module, "native_fits", lambda *tensors: False),
        patch.object(grouped_module, "workers_enabled", lambda: True),
        patch.object(grouped_module, "shares_pay_off", lambda *estimate: reads_pay_off),
    ):
        plan = grouped_module.plan_experts(x, token, expert, w_in, w_out, act)
    assert plan.backend == "grouped_mm" and not plan.parallel and not plan.shares
    assert plan.single_threaded != reads_pay_off


def test_expert_loops_are_compiled_where_torchscript_is():
    """The fast path the tests above check is the one that runs: TorchScript compiles the loops
    (this torch has it), and `MOEKIT_LOOPS=python` selects the Python loops."""
    assert all(isinstance(loop, torch.jit.ScriptFunction) for loop in expert_loops())
    with patch.dict(os.environ, {"MOEKIT_LOOPS": "python"}):
        assert expert_loops() == (products_into, backward_pairs_into)


@pytest.mark.parametrize("path", ["workers", "workers_python", "fused", *LIBRARY_KERNEL_PATHS])
def test_worker_paths_are_bitwise_deterministic(path):
    """Experts go to whichever thread is free, but each is computed by one thread in one way and
    combined in a fixed order: repeated fp32 runs agree bit for bit (training runs repeat)."""
    gen = torch.Generator().manual_seed(6)
    num_tokens, num_experts, k, hidden, ff = 700, 12, 4, 32, 24  # k > 2: sum order shows
    token, expert = sorted_topk_assignments(torch.randn(num_tokens, num_experts, generator=gen), k)
    inputs = swiglu_inputs(gen, num_tokens, len(token), num_experts, hidden, ff, 0.2, torch.float32)
    upstream = torch.randn(num_tokens, hidden, generator=gen)
    with torch_threads(2), expert_path(path) as parallel:
        runs = [
            swiglu_output_and_grads(
                inputs, token, expert, upstream, torch.float32, backend="loop", parallel_workers=parallel
            )
            for _ in range(3)
        ]
    for again in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], again, strict=True))


@pytest.mark.parametrize("act_name", ["swiglu", "gelu"])
@pytest.mark.parametrize("weight_on", ["output", "input"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("path", ["workers", "workers_python", "fused"])
@pytest.mark.parametrize("num_tokens", [400, 3])
def test_float32_worker_paths_match_float64_for_every_expert_kind(
    act_name, weight_on, bias, path, num_tokens
):
    """fp32 on the worker paths takes moekit's own kernels where they run: SwiGLU experts without
    biases, routing weight on the output, as whole experts in one C++ call (`swiglu_loops`), the
    others on the native products; 3 tokens is decode (one or two rows per expert: the kernel's dot
    products). Output and every gradient against float64, one expert empty."""
    gen = torch.Generator().manual_seed(8)
    num_experts, k, hidden, ff = 6, 2, 24, 20
    act = make_activation(act_name)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, 3] = -float("inf")  # expert 3 receives nothing
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
    results = {}
    with torch_threads(2), expert_path(path) as parallel:
        for dtype in (torch.float64, torch.float32):
            leaves = [t.to(dtype).requires_grad_() for t in exact]
            x, weight, w_in, w_out, *biases = leaves
            b_in, b_out = biases if bias else (None, None)
            plan = grouped_module.plan_experts(
                x, token, expert, w_in, w_out, act, weight_on, backend="loop", parallel_workers=parallel
            )
            if dtype == torch.float32 and native_available():
                assert plan.native and plan.swiglu_loops == (act_name == "swiglu" and weight_on == "output")
            y = grouped_experts(
                x, token, expert, weight, w_in, w_out, b_in, b_out, act, weight_on, "loop", parallel
            )
            results[dtype] = (y, *torch.autograd.grad((y * upstream.to(dtype)).sum(), leaves))
    for fast, want in zip(results[torch.float32], results[torch.float64], strict=True):
        torch.testing.assert_close(fast.double(), want, rtol=1e-4, atol=1e-4)
    for grad in results[torch.float32][3:5]:
        assert torch.count_nonzero(grad[3]) == 0
