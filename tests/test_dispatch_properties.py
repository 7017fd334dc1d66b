"""Property tests for routing and dispatch invariants: empty experts, one hot expert, drops, masks,
and every path of the expert dispatch against float64."""

import os
from contextlib import contextmanager
from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit.dispatch.grouped as grouped_module
from helpers import LOOPS_UNAVAILABLE, needs_loops, torch_threads
from moekit.dispatch.grouped import NativeLoops, PortableLoops, grouped_experts, packed_grad
from moekit.experts.activations import make_activation
from moekit.kernels.native import loops_available
from moekit.routing.capacity import apply_capacity, expert_capacity, priority_key
from moekit.routing.record import Assignments
from moekit.routing.spec import RouterSpec
from moekit.routing.token_choice import TokenChoiceRouter

# also run by `make test` on the kernel built for the CPU's other vector set
pytestmark = pytest.mark.other_vector_set

# The dispatch's paths: the C++ expert loops on two threads and on the calling thread (fp32 on
# the kernel chosen here; other dtypes on torch's at::mm), the loops forced onto at::mm, and the
# portable path (torch.mm per expert; grouped_mm where its dtype and strides allow).
LOOP_PATHS = ("loops", "loops_one_thread", "loops_mm")
EXPERT_PATHS = (*LOOP_PATHS, "portable", "portable_grouped_mm")


@contextmanager
def expert_path(path: str):
    """Run the block on `path`; yields the `backend` and `threads` options of `grouped_experts`."""
    native = {"loops_mm": "mm", "portable": "0", "portable_grouped_mm": "0"}.get(path, "auto")
    if path in LOOP_PATHS and not loops_available():
        pytest.skip(LOOPS_UNAVAILABLE)
    with patch.dict(os.environ, {"MOEKIT_NATIVE": native}):
        yield {
            "backend": "auto" if path == "portable_grouped_mm" else "loop",
            "threads": 1 if path == "loops_one_thread" else (2 if path in LOOP_PATHS else None),
        }


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
    """On every path of the dispatch (the C++ loops on two threads and on one, forced onto at::mm,
    the portable path), whatever the machine would choose."""
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
    with expert_path(path) as options:
        y = grouped_experts(x, token, expert, weight, w_in, w_out, b_in, b_out, act, weight_on, **options)
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


@needs_loops
def test_loops_on_two_threads_match_the_portable_loop():
    """The C++ loops with experts taken by two threads compute what one torch.mm per expert does."""
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_experts, k, hidden, ff = 300, 6, 2, 8, 5
    token, expert = sorted_topk_assignments(torch.randn(num_tokens, num_experts, generator=gen), k)
    inputs = swiglu_inputs(gen, num_tokens, len(token), num_experts, hidden, ff, weight_scale=1.0)
    upstream = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen)
    results = []
    with torch_threads(2):
        for path in ("portable", "loops"):
            with expert_path(path) as options:
                results.append(
                    swiglu_output_and_grads(inputs, token, expert, upstream, torch.float64, **options)
                )
    for portable, loops in zip(*results, strict=True):
        torch.testing.assert_close(loops, portable, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", EXPERT_PATHS)
def test_float32_paths_match_float64(path):
    """fp32 experts of very different sizes (one expert in almost every token's top-2, ragged
    tails, one expert empty), on every path: the output and every gradient close to the same
    computation in float64 (itself held to the per-assignment reference above)."""
    gen = torch.Generator().manual_seed(4)
    num_tokens, num_experts, k, hidden, ff = 1500, 6, 2, 32, 24
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, 0] += 4.0  # expert 0 is in almost every token's top-2
    logits[:, 5] = -float("inf")  # expert 5 receives nothing
    token, expert = sorted_topk_assignments(logits, k)
    counts = torch.bincount(expert, minlength=num_experts)
    assert counts[0] > 1000 and counts[5] == 0
    inputs = swiglu_inputs(gen, num_tokens, len(token), num_experts, hidden, ff, weight_scale=0.2)
    upstream = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen)
    results = {}
    with torch_threads(2), expert_path(path) as options:
        for dtype in (torch.float64, torch.float32):
            results[dtype] = swiglu_output_and_grads(inputs, token, expert, upstream, dtype, **options)
    for fast, exact in zip(results[torch.float32], results[torch.float64], strict=True):
        torch.testing.assert_close(fast.double(), exact, rtol=1e-4, atol=1e-4)
    for grad in results[torch.float32][3:]:
        assert torch.count_nonzero(grad[5]) == 0


@pytest.mark.parametrize("path", LOOP_PATHS)
@settings(max_examples=15, deadline=None)
@given(
    counts=st.lists(st.integers(0, 9), min_size=2, max_size=5),
    last_token_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_whole_swiglu_passes_read_every_row_to_the_ends_of_their_buffers(path, counts, last_token_last, seed):
    """The SwiGLU passes read each expert's rows of x and grad_out in token order (in place on
    the tile kernel, gathered on at::mm) and h row by row, requesting the next row while one is
    worked on: experts of one row or none, tokens in any order, the last token's row read last
    and the last expert ending at h's last row, on the tile kernel (AVX-512 or AVX2), on one
    thread, and on at::mm. Output and every gradient against float64."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens, hidden, ff = 24, 20, 12
    counts = [*counts, 16]  # one expert large enough that the call is not decode-sized
    expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    token = torch.randint(0, num_tokens, (len(expert),), generator=gen)
    if last_token_last:
        token[-1] = num_tokens - 1
    inputs = swiglu_inputs(gen, num_tokens, len(token), len(counts), hidden, ff, weight_scale=0.3)
    upstream = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen)
    exact = swiglu_output_and_grads(inputs, token, expert, upstream, torch.float64)
    with torch_threads(2), expert_path(path) as options:
        x, _, w_in, w_out = (t.float() for t in inputs)
        plan = grouped_module.plan_experts(
            x, token, expert, w_in, w_out, make_activation("swiglu"), "output", **options
        )
        assert isinstance(plan.loops, NativeLoops) and plan.loops.whole_swiglu
        assert plan.path == "many_tokens"
        fast = swiglu_output_and_grads(inputs, token, expert, upstream, torch.float32, **options)
    for got, want in zip(fast, exact, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@needs_loops
@pytest.mark.parametrize(
    "weight_on, dtype, ff",
    [
        ("output", torch.bfloat16, 16),
        ("input", torch.bfloat16, 16),
        ("output", torch.bfloat16, 21),
        ("output", torch.float16, 21),
    ],
)
def test_reduced_precision_loops_match_float64(weight_on, dtype, ff):
    """bf16 and fp16 experts run on the C++ loops' at::mm kernel (the tile kernel is fp32 only),
    their SwiGLU rows converted to fp32 vectors and back (ff of whole vectors, and with a tail):
    output and gradients within the dtype's precision of float64, on two threads and on one."""
    gen = torch.Generator().manual_seed(10)
    num_tokens, num_experts, k, hidden = 200, 6, 2, 32
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, 2] = -float("inf")
    token, expert = sorted_topk_assignments(logits, k)
    inputs = swiglu_inputs(gen, num_tokens, len(token), num_experts, hidden, ff, weight_scale=0.2)
    upstream = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen)
    exact = swiglu_output_and_grads(inputs, token, expert, upstream, torch.float64, weight_on=weight_on)
    for threads in (2, 1):
        with torch_threads(2):
            x, _, w_in, w_out = (t.to(dtype) for t in inputs)
            plan = grouped_module.plan_experts(
                x, token, expert, w_in, w_out, make_activation("swiglu"), weight_on
            )
            assert isinstance(plan.loops, NativeLoops) and plan.loops.kernel == "mm"
            fast = swiglu_output_and_grads(
                inputs, token, expert, upstream, dtype, weight_on=weight_on, threads=threads
            )
        for got, want in zip(fast, exact, strict=True):
            scale = want.abs().max().item()
            torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2 * scale)
        for grad in fast[3:]:  # the packed weight gradients
            assert torch.count_nonzero(grad[2]) == 0


def test_decode_under_autocast_computes_from_the_fp32_weights():
    """Under bf16 autocast a decode-sized call outside autograd computes from the fp32 weights as
    they are (casting every weight first cost more than the step) and returns bf16: the fp32
    result rounded once. With gradients wanted the products run in bf16 as autocast asks."""
    gen = torch.Generator().manual_seed(11)
    num_tokens, num_experts, k, hidden, ff = 2, 16, 2, 32, 16
    token, expert = sorted_topk_assignments(torch.randn(num_tokens, num_experts, generator=gen), k)
    x, weight, w_in, w_out = swiglu_inputs(
        gen, num_tokens, len(token), num_experts, hidden, ff, weight_scale=0.3, dtype=torch.float32
    )
    act = make_activation("swiglu")

    def run(autocast: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return grouped_experts(x, token, expert, weight, w_in, w_out, None, None, act)

    with torch.no_grad():
        fp32, decoded = run(False), run(True)
    assert fp32.dtype == torch.float32 and decoded.dtype == torch.bfloat16
    assert torch.equal(decoded, fp32.to(torch.bfloat16))
    w_in.requires_grad_()
    trained = run(True)
    assert trained.dtype == torch.bfloat16 and not torch.equal(trained, decoded)
    torch.testing.assert_close(trained.float(), fp32, rtol=5e-2, atol=5e-2)


@needs_loops
@pytest.mark.parametrize("caller_threads", [1, 2])
def test_decode_reads_experts_on_the_callers_threads(caller_threads):
    """At decode (a row or two per expert) the C++ loops run on the caller's threads (generation
    chooses one or all by timing its steps), on one for a single active expert; float64 takes the
    loops too (on at::mm); `MOEKIT_NATIVE=0` gives the portable path (grouped_mm where it runs)."""
    gen = torch.Generator().manual_seed(9)
    token, expert = sorted_topk_assignments(torch.randn(3, 6, generator=gen), 2)
    act = make_activation("swiglu")
    x, _, w_in, w_out = swiglu_inputs(gen, 3, len(token), 6, 16, 8, 1.0, torch.float32)
    with torch_threads(caller_threads):
        plan = grouped_module.plan_experts(x, token, expert, w_in, w_out, act)
        assert plan.path == "decode" and isinstance(plan.loops, NativeLoops)
        assert len(plan.groups.nonempty) > 1 and plan.loops.threads == caller_threads
        one_expert = grouped_module.plan_experts(x, token[:1], expert[:1], w_in, w_out, act)
        assert one_expert.path == "decode" and one_expert.loops.threads == 1
        exact = grouped_module.plan_experts(x.double(), token, expert, w_in.double(), w_out.double(), act)
        assert exact.loops.kernel == "mm" and exact.path == "decode"
        with patch.dict(os.environ, {"MOEKIT_NATIVE": "0"}):
            portable = grouped_module.plan_experts(x, token, expert, w_in, w_out, act)
        assert portable.path == "portable" and portable.loops == PortableLoops(portable.groups, True)


@needs_loops
def test_many_tokens_run_on_torchs_threads_and_one_expert_on_torchs_threaded_mm():
    gen = torch.Generator().manual_seed(11)
    act = make_activation("gelu")
    x = torch.randn(64, 16, generator=gen)
    w_in, w_out = torch.randn(4, 8, 16, generator=gen), torch.randn(4, 16, 8, generator=gen)
    token = torch.arange(64)
    with torch_threads(2):
        plan = grouped_module.plan_experts(x, token, torch.arange(64) // 16, w_in, w_out, act)
        assert plan.path == "many_tokens" and plan.loops.threads == 2
        alone = grouped_module.plan_experts(x, token, torch.zeros_like(token), w_in, w_out, act)
        assert alone.loops.kernel == "mm" and alone.loops.threads == 2


class _NanAllocator:
    """Allocates NaN-filled tensors, so that a test sees which slices a function wrote."""

    def new_empty(self, shape):
        return torch.full(shape, float("nan"))


@given(st.lists(st.booleans(), min_size=1, max_size=12))
def test_packed_gradient_zeroes_exactly_the_empty_experts(empty):
    """The slices of experts without rows are zero (one call per run of them); the others are left
    for the experts' products to write."""
    empty_experts = [e for e, is_empty in enumerate(empty) if is_empty]
    packed = packed_grad(torch.Size((len(empty), 2, 3)), _NanAllocator(), empty_experts)
    for e, is_empty in enumerate(empty):
        assert bool((packed[e] == 0).all()) if is_empty else bool(packed[e].isnan().all())


@pytest.mark.parametrize("path", EXPERT_PATHS)
def test_every_path_is_bitwise_deterministic(path):
    """Experts go to whichever thread is free, but each is computed by one thread in one way and
    combined in a fixed order: repeated fp32 runs agree bit for bit (training runs repeat)."""
    gen = torch.Generator().manual_seed(6)
    num_tokens, num_experts, k, hidden, ff = 700, 12, 4, 32, 24  # k > 2: sum order shows
    token, expert = sorted_topk_assignments(torch.randn(num_tokens, num_experts, generator=gen), k)
    inputs = swiglu_inputs(gen, num_tokens, len(token), num_experts, hidden, ff, 0.2, torch.float32)
    upstream = torch.randn(num_tokens, hidden, generator=gen)
    with torch_threads(2), expert_path(path) as options:
        runs = [
            swiglu_output_and_grads(inputs, token, expert, upstream, torch.float32, **options)
            for _ in range(3)
        ]
    for again in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], again, strict=True))


@pytest.mark.parametrize("act_name", ["swiglu", "gelu"])
@pytest.mark.parametrize("weight_on", ["output", "input"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("path", EXPERT_PATHS)
@pytest.mark.parametrize("num_tokens", [400, 3])
def test_float32_paths_match_float64_for_every_expert_kind(act_name, weight_on, bias, path, num_tokens):
    """SwiGLU experts without biases, routing weight on the output, run whole in one C++ call per
    pass on the loop paths, the others product by product; 3 tokens is decode (one or two rows per
    expert). Output and every gradient against float64, one expert empty."""
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
    with torch_threads(2), expert_path(path) as options:
        for dtype in (torch.float64, torch.float32):
            leaves = [t.to(dtype).requires_grad_() for t in exact]
            x, weight, w_in, w_out, *biases = leaves
            b_in, b_out = biases if bias else (None, None)
            plan = grouped_module.plan_experts(x, token, expert, w_in, w_out, act, weight_on, **options)
            assert isinstance(plan.loops, NativeLoops) == (path in LOOP_PATHS)
            y = grouped_experts(x, token, expert, weight, w_in, w_out, b_in, b_out, act, weight_on, **options)
            results[dtype] = (y, *torch.autograd.grad((y * upstream.to(dtype)).sum(), leaves))
    for fast, want in zip(results[torch.float32], results[torch.float64], strict=True):
        torch.testing.assert_close(fast.double(), want, rtol=1e-4, atol=1e-4)
    for grad in results[torch.float32][3:5]:
        assert torch.count_nonzero(grad[3]) == 0


@pytest.mark.parametrize("frozen", ["w_in", "w_out", "both"])
@pytest.mark.parametrize("path", EXPERT_PATHS)
def test_frozen_expert_weights_leave_the_other_gradients_exact(frozen, path):
    """Experts whose weights take no gradient (a frozen base under adapters, a partly frozen
    model) skip those weight gradients in the backward; the gradients of x, the routing weights
    and the trained weights are float64's all the same."""
    gen = torch.Generator().manual_seed(11)
    num_tokens, num_experts, k, hidden, ff = 300, 6, 2, 24, 20
    token, expert = sorted_topk_assignments(torch.randn(num_tokens, num_experts, generator=gen), k)
    inputs = swiglu_inputs(gen, num_tokens, len(token), num_experts, hidden, ff, 0.2)
    upstream = torch.randn(num_tokens, hidden, dtype=torch.float64, generator=gen)
    trained = {"w_in": (False, True), "w_out": (True, False), "both": (False, False)}[frozen]
    results = {}
    with torch_threads(2), expert_path(path) as options:
        for dtype in (torch.float64, torch.float32):
            x, weight, w_in, w_out = (t.detach().to(dtype) for t in inputs)
            x.requires_grad_(), weight.requires_grad_()
            w_in.requires_grad_(trained[0])
            w_out.requires_grad_(trained[1])
            leaves = [x, weight] + [w for w, t in zip((w_in, w_out), trained, strict=True) if t]
            y = grouped_experts(
                x, token, expert, weight, w_in, w_out, None, None, make_activation("swiglu"), **options
            )
            results[dtype] = (y, *torch.autograd.grad((y * upstream.to(dtype)).sum(), leaves))
    assert len(results[torch.float32]) == 3 + sum(trained)
    for fast, want in zip(results[torch.float32], results[torch.float64], strict=True):
        torch.testing.assert_close(fast.double(), want, rtol=1e-4, atol=1e-4)
