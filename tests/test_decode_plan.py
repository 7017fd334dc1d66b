"""A generation's one-token steps through `DecodePlan`: `FamilyModel.forward`'s logits bit for bit
for every family it covers, padded batches and sliding windows, one thread and two, the row
kernels' path for large weights; the routing a capture records; the plan given up where a weight
or an override changes, and not taken where a step must run the forward (overrides, hooks)."""

from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import saved_and_loaded, torch_threads
from moekit.inference.generate import generate, stream
from moekit.routing.override import Overrides, RoutingCapture, RoutingOverride, override_routing

transformers = pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
from moekit.interop.decode_plan import DecodePlan  # noqa: E402
from moekit.interop.tiny import TINY_CONFIGS  # noqa: E402

# The plan covers MoE layers whose experts run on the tile kernel (`few_rows.route_rows`)
# (and `make test` runs it again on the kernel built for the CPU's other vector set)
pytestmark = [pytest.mark.usefixtures("experts_on_tile_kernel"), pytest.mark.other_vector_set]

# The families whose steps the plan covers (GPT-OSS's experts have biases and Llama 4's take the
# routing weight on their input: their MoE layers take paths of their own)
COVERED = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "granitemoe", "dbrx"}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A Qwen3-MoE whose attention weights, head and experts each read more than a thread hand-off
    pays for: the plan's steps take the row kernels (`rows_linear`, `rows_linear_parts`) and the
    experts' one call on the caller's threads."""
    return saved_and_loaded(
        tmp_path_factory.mktemp("wide"), "qwen3_moe", seed=5, vocab_size=512, hidden_size=1024,
        num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
    )  # fmt: skip


def left_padded(vocab, lengths=(6, 3, 1), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, max(lengths) - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def both_ways(model, ids, mask, steps=6):
    """Per step, the logits of the forward and of the plan, each on its own cache, fed the same
    greedy tokens (the forward's)."""
    forward_cache, plan_cache = model.new_cache(), model.new_cache()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    prompt = model(ids, attention_mask=mask, position_ids=positions, cache=forward_cache).logits[:, -1]
    assert torch.equal(
        prompt, model(ids, attention_mask=mask, position_ids=positions, cache=plan_cache).logits[:, -1]
    )
    plan = DecodePlan.build(model, ids.shape[0])
    assert plan is not None
    token = prompt.argmax(-1, keepdim=True)
    pairs = []
    for _ in range(steps):
        positions = positions[:, -1:] + 1
        expected = model(token, position_ids=positions, cache=forward_cache).logits[:, -1]
        pairs.append((expected, plan.step(token, positions, plan_cache)))
        token = expected.argmax(-1, keepdim=True)
    return pairs


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_plan_gives_the_forwards_logits_bit_for_bit_for_every_family_it_covers(families, family):
    """Left-padded rows of 6, 3 and 1 tokens (sliding windows shorter than the sequence in Mixtral's
    and Qwen2-MoE's tiny configurations; OLMoE's, DeepSeek-V3's and DBRX's attention through their
    modules); families it does not cover get no plan."""
    model = families(family)
    ids, mask = left_padded(model.config.vocab_size)
    with torch.inference_mode():
        if family not in COVERED:
            assert DecodePlan.build(model, 3) is None
            return
        for expected, planned in both_ways(model, ids, mask, steps=9):
            assert torch.equal(planned, expected)


@settings(max_examples=15, deadline=None)
@given(
    family=st.sampled_from(sorted(COVERED)),
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    steps=st.integers(1, 6),
    threads=st.sampled_from([1, 2]),
)
def test_plan_equals_the_forward_for_any_padding_batch_and_thread_count(
    families, family, lengths, steps, threads
):
    """Any left padding of 1-4 rows, any number of steps (past the tiny configurations' windows of
    5-6 slots), one thread or two: the plan's logits are the forward's bit for bit."""
    model = families(family)
    ids, mask = left_padded(model.config.vocab_size, tuple(lengths), seed=len(lengths) + steps)
    with torch_threads(threads), torch.inference_mode():
        for expected, planned in both_ways(model, ids, mask, steps=steps):
            assert torch.equal(planned, expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_plan_on_the_row_kernels_gives_the_forwards_logits_bit_for_bit(wide_model, threads):
    """Large weights: the plan's products are the row kernels' calls, on one thread and two, at
    batch 1 and at a padded batch of 3."""
    calls = []
    original = torch.ops.moekit.rows_linear_parts
    with torch_threads(threads), torch.inference_mode():
        for lengths in ((5,), (6, 3, 1)):
            ids, mask = left_padded(wide_model.config.vocab_size, lengths)
            for expected, planned in both_ways(wide_model, ids, mask):
                assert torch.equal(planned, expected)
        plan = DecodePlan.build(wide_model, 1)
        assert plan.layers[0].attention.weight is None  # q, k and v read where they lie

        def counted(*args):
            calls.append(1)
            return original(*args)

        torch.ops.moekit.rows_linear_parts = counted
        try:
            ids, mask = left_padded(wide_model.config.vocab_size, (5,))
            both_ways(wide_model, ids, mask, steps=2)
        finally:
            torch.ops.moekit.rows_linear_parts = original
    assert len(calls) == 2 * 2 * 2  # two steps, two layers, the forward's and the plan's


def test_plan_built_on_one_thread_runs_large_experts_on_the_steps_threads(wide_model):
    """A plan built during a step on one thread (a timed trial, a rebuild) still runs experts
    whose reads pay a hand-off on the threads of each later step, as the forward would."""
    original = torch.ops.moekit.topk_swiglu_rows
    taken = []

    def recorded(*args):
        taken.append(args[-1])
        return original(*args)

    ids, mask = left_padded(wide_model.config.vocab_size, (5,))
    cache = wide_model.new_cache()
    with torch.inference_mode():
        logits = wide_model(ids, cache=cache).logits[:, -1]
        with torch_threads(1):
            plan = DecodePlan.build(wide_model, 1)
        torch.ops.moekit.topk_swiglu_rows = recorded
        try:
            with torch_threads(2):
                plan.step(logits.argmax(-1, keepdim=True), torch.tensor([[5]]), cache)
        finally:
            torch.ops.moekit.topk_swiglu_rows = original
    assert taken == [2, 2]  # both MoE layers, on the step's two threads


def test_generation_takes_the_plan_and_keeps_the_forwards_tokens(families, monkeypatch):
    """`generate` steps through the plan (its step runs) and its tokens are those of the same
    generation with the plan turned off."""
    model = families("qwen3_moe")
    ids, mask = left_padded(model.config.vocab_size)
    steps = []
    original = DecodePlan.step

    def counted(self, *args):
        steps.append(1)
        return original(self, *args)

    monkeypatch.setattr(DecodePlan, "step", counted)
    planned = generate(model, ids, mask, max_new_tokens=8)
    assert len(steps) == 7  # every step after the prompt's
    monkeypatch.setattr(DecodePlan, "build", classmethod(lambda cls, model, batch: None))
    assert torch.equal(generate(model, ids, mask, max_new_tokens=8), planned)


def test_a_capture_records_the_forwards_routing_through_the_plan(families):
    model = families("qwen2_moe")  # shared experts too
    ids, mask = left_padded(model.config.vocab_size)
    captures = {}
    for planned in (True, False):
        capture = RoutingCapture()
        with override_routing(model, Overrides(capture=capture)), torch.inference_mode():
            assert DecodePlan.build(model, 3) is not None
            if planned:
                generate(model, ids, mask, max_new_tokens=5)
            else:
                with patch.object(DecodePlan, "build", classmethod(lambda cls, model, batch: None)):
                    generate(model, ids, mask, max_new_tokens=5)
        captures[planned] = capture.routings
    assert captures[True].keys() == captures[False].keys() and captures[True]
    for layer, routings in captures[True].items():
        assert len(routings) == 5  # the prompt's and four one-token steps'
        for mine, theirs in zip(routings, captures[False][layer], strict=True):
            assert torch.equal(mine.logits, theirs.logits)
            assert torch.equal(mine.kept.expert, theirs.kept.expert)
            assert torch.equal(mine.kept.weight, theirs.kept.weight)
            assert torch.equal(mine.kept.token, theirs.kept.token)


def test_a_weight_changed_between_steps_ends_the_plan_and_is_seen(families):
    """A weight changed in place, a parameter replaced, an override attached, a hook registered:
    `current` turns False; and a stream whose consumer changes a weight mid-way decodes as the
    forward does."""
    model = families("qwen3_moe")
    ids, mask = left_padded(model.config.vocab_size)
    with torch.inference_mode():
        plan = DecodePlan.build(model, 3)
    assert plan.current()
    q_norm = model.layers[0].attn.q_norm.weight  # the plan holds a joined copy of it
    with torch.no_grad():
        q_norm.mul_(1.5)
    assert not plan.current()
    with torch.no_grad():
        q_norm.div_(1.5)

    def decode(planned):
        tokens = []
        builder = DecodePlan.build if planned else classmethod(lambda cls, model, batch: None)
        saved = q_norm.detach().clone()
        with patch.object(DecodePlan, "build", builder):
            for i, token in enumerate(stream(model, ids, mask, max_new_tokens=6)):
                tokens.append(token)
                if i == 2:
                    with torch.no_grad():
                        q_norm.mul_(-2.0)
        with torch.no_grad():
            q_norm.copy_(saved)
        return torch.stack(tokens)

    assert torch.equal(decode(planned=True), decode(planned=False))
    with torch.inference_mode():
        plan = DecodePlan.build(model, 3)
    head = model.head
    kept = head.weight
    head.weight = torch.nn.Parameter(kept.detach().clone())
    assert not plan.current()
    head.weight = kept
    with override_routing(model, Overrides(capture=RoutingCapture())):
        assert not plan.current()
    assert plan.current()
    handle = model.norm.register_forward_pre_hook(lambda module, args: None)
    assert not plan.current()
    handle.remove()


def test_no_plan_where_a_step_must_run_the_forward(families):
    """A routing override that changes routing, a forward hook and autograd each keep the
    forward (which applies them), and a model outside the families' decoder has no plan."""
    from helpers import tiny_lm

    model = families("qwen3_moe")
    with torch.inference_mode():
        assert DecodePlan.build(model, 1) is not None
        with override_routing(model, RoutingOverride(mask=[0])):
            assert DecodePlan.build(model, 1) is None
        handle = model.layers[1].attn.register_forward_hook(lambda module, args, out: None)
        try:
            assert DecodePlan.build(model, 1) is None
        finally:
            handle.remove()
        assert DecodePlan.build(tiny_lm(), 1) is None
    assert DecodePlan.build(model, 1) is None  # autograd on
