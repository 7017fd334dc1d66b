"""ODP's token-importance half (MC-MoE #38): the importance score against a float64 reference, the
per-sequence skip/protect split, the routing it changes (unimportant tokens lose their experts,
important and unselected ones keep the router's), bit-identity when it selects no token, and
moekit's LM and every HF family built tiny."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import tiny_lm, tiny_models
from moekit.errors import ConfigError
from moekit.inference.generate import generate
from moekit.inference.methods import odp_overrides
from moekit.inference.methods.common import full_logits
from moekit.models.lm import LanguageModel
from moekit.routing.importance import (
    IMPORTANCE_KEY,
    attending_positions,
    attention_received,
    importance_split,
    mc_moe_importance,
    released_importance,
)
from moekit.routing.override import (
    Overrides,
    RoutingCapture,
    RoutingOverride,
    dense_routing,
    override_routing,
)

transformers = pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
from moekit.interop.tiny import TINY_CONFIGS  # noqa: E402

FAMILIES = list(TINY_CONFIGS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory)


def reference_received(q, k, scale, allowed, sinks=None):
    """Float64 loops: for each key j, the head-mean probability of every query i that may attend
    to it, averaged over those queries."""
    q, k = q.double(), k.double()
    b, h, s, _ = q.shape
    length = k.shape[2]
    groups = h // k.shape[1]
    out = torch.zeros(b, length, dtype=torch.float64)
    for row in range(b):
        probs = torch.zeros(h, s, length, dtype=torch.float64)
        for head in range(h):
            for i in range(s):
                keys = [j for j in range(length) if allowed[row, i, j]]
                logits = torch.stack([q[row, head, i] @ k[row, head // groups, j] * scale for j in keys])
                if sinks is not None:
                    logits = torch.cat([logits, sinks[head].double().reshape(1)])
                p = torch.softmax(logits, 0)
                for n, j in enumerate(keys):
                    probs[head, i, j] = p[n]
        mean = probs.mean(0)
        for j in range(length):
            attending = [i for i in range(s) if allowed[row, i, j]]
            out[row, j] = sum(mean[i, j] for i in attending) / max(len(attending), 1)
    return out[:, length - s :]


def test_attention_received_matches_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k = torch.randn(2, 2, 5, 8, generator=gen)  # grouped-query: 2 query heads per key head
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    got = attention_received(q, k, 0.3)
    want = reference_received(q, k, 0.3, causal.expand(2, 5, 5))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # an explicit mask with a left-padded row, and attention sinks
    mask = causal.expand(2, 5, 5).clone()
    mask[1, :, :2] = False
    mask[1, :2, :2] = torch.eye(2, dtype=torch.bool)  # padding attends to itself only
    sinks = torch.randn(4, generator=gen)
    got = attention_received(q, k, 0.3, mask[:, None], sinks)
    torch.testing.assert_close(got.double(), reference_received(q, k, 0.3, mask, sinks), rtol=1e-5, atol=1e-6)
    # cached keys first: the step's 3 queries attend to the 2 cached keys and causally to their own
    q_step = q[:, :, :3]
    allowed = torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2)
    got = attention_received(q_step, k, 0.3)
    want = reference_received(q_step, k, 0.3, allowed.expand(2, 3, 5))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert attention_received(q, k[:, :, :3], 0.3) is None  # keys do not cover the step


def test_released_importance_is_the_norm_over_the_attending_positions():
    hidden = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [0.5, 0.5], [-4.0, 0.0]]])
    mask = torch.tensor([[False, True, True, True]])  # one left-padding position
    assert attending_positions(mask).tolist() == [[0, 3, 2, 1]]
    got = released_importance(hidden, mask)
    assert got[0, 1:].tolist() == pytest.approx([3.0 / 3, 1.0 / 2, 4.0 / 1])
    # the paper's rule with every token receiving the same attention is the norm times it
    flat = mc_moe_importance(hidden, torch.full((1, 4), 0.5))
    assert flat[0].tolist() == pytest.approx([1.5, 1.5, 0.5, 2.0])


@given(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=12),
    st.integers(0, 4),
    st.floats(0, 1),
    st.floats(0, 1),
    st.booleans(),
)
@settings(max_examples=80, deadline=None)
def test_importance_split_takes_the_lowest_and_highest_real_tokens(values, padding, low, high, spare_last):
    padding = min(padding, len(values) - 1)
    importance = torch.tensor([values])
    mask = torch.ones(1, len(values), dtype=torch.bool)
    mask[0, :padding] = False
    skip, protect = importance_split(importance, mask, low, high, spare_last_token=spare_last)
    skip, protect, importance = skip[0], protect[0], importance[0]
    n = len(values) - padding
    wanted = min(int(low * n), n - 1) if spare_last else int(low * n)
    assert not (skip | protect)[~mask[0]].any() and not (skip & protect).any()
    assert int(protect.sum()) == int(high * n)  # τ_h·n most important, τ_l·n least, per sequence
    assert wanted - int(high * n) <= int(skip.sum()) <= wanted  # protection wins
    if spare_last:
        assert not skip[-1]  # the last token's output is the next token's distribution
    candidates = mask[0].clone()
    if spare_last:
        candidates[-1] = False
    rest = candidates & ~skip & ~protect
    if skip.any() and rest.any():
        assert importance[skip].max() <= importance[rest].min()
    if protect.any() and (mask[0] & ~protect).any():
        assert importance[protect].min() >= importance[mask[0] & ~protect].max()


def test_the_last_prompt_token_is_spared_unless_asked():
    importance = torch.tensor([[5.0, 4.0, 3.0, 0.0], [9.0, 2.0, 1.0, 0.5]])
    mask = torch.tensor([[True] * 4, [False, True, True, True]])  # the second row left-padded
    spared, _ = importance_split(importance, mask, 0.5, 0.0)
    assert spared.tolist() == [[False, True, True, False], [False, False, True, False]]
    literal, _ = importance_split(importance, mask, 0.5, 0.0, spare_last_token=False)
    assert literal.tolist() == [[False, False, True, True], [False, False, False, True]]


def prompt(model, rows=2, length=10, seed=0):
    vocab = model.embed.num_embeddings
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask.bool()


def routed(model, ids, real, overrides):
    """(logits, the first MoE layer's record) under `overrides`."""
    capture = RoutingCapture()
    with torch.no_grad(), override_routing(model, Overrides(overrides.layers, overrides.default, capture)):
        logits = full_logits(model, ids, real)
    return logits, capture.routings[0][0]


def expert_sets(routing):
    sets = [set() for _ in range(routing.num_tokens)]
    for token, expert in zip(routing.kept.token.tolist(), routing.kept.expert.tolist(), strict=True):
        sets[token].add(expert)
    return sets


@pytest.mark.parametrize("name", ["moekit", *FAMILIES])
@pytest.mark.parametrize("importance", ["attention", "position"])
def test_unimportant_tokens_skip_their_experts_and_the_rest_keep_the_routers(models, name, importance):
    model = models(name)
    ids, real = prompt(model)
    _, plain = routed(model, ids, real, Overrides())
    _, skipped = routed(model, ids, real, odp_overrides(0.0, skip_fraction=0.3, importance=importance))
    score = skipped.extras[IMPORTANCE_KEY].reshape(real.shape)
    skip, _ = importance_split(score, real, 0.3, 0.0)
    assert skip.sum(-1).tolist() == [3, 2]  # int(0.3 n) of each row's real tokens (10 and 7)
    flat = skip.reshape(-1)
    counts = skipped.experts_per_token()
    assert (counts[flat] == 0).all()  # the paper's rule: no routed expert at all
    # the first MoE layer sees the same input: every other token keeps the router's own experts
    before, after = expert_sets(plain), expert_sets(skipped)
    assert all(after[t] == before[t] for t in range(len(before)) if not flat[t])
    # keeping one expert instead: each skipped token keeps its highest-weight expert
    _, top1 = routed(
        model, ids, real, odp_overrides(0.0, skip_fraction=0.3, skipped_top_k=1, importance=importance)
    )
    first = dense_routing(plain)[1].argmax(-1)
    kept = expert_sets(top1)
    assert all(kept[t] == {int(first[t])} for t in range(len(kept)) if flat[t])


@pytest.mark.parametrize("name", ["moekit", "qwen3_moe", "deepseek_v3"])
def test_protected_tokens_are_spared_the_weight_ratio_rule(models, name):
    model = models(name)
    ids, real = prompt(model)
    _, plain = routed(model, ids, real, Overrides())
    _, pruned = routed(model, ids, real, odp_overrides(1.0, protect_fraction=0.2))
    score = pruned.extras[IMPORTANCE_KEY].reshape(real.shape)
    _, protect = importance_split(score, real, 0.0, 0.2)
    flat, mask = protect.reshape(-1), real.reshape(-1)
    before, after = expert_sets(plain), expert_sets(pruned)
    k = max(len(s) for s in before)
    assert k > 1 and flat.sum() == 2 + 1  # int(0.2 * 10) + int(0.2 * 7)
    for t in range(len(before)):
        if flat[t]:
            assert after[t] == before[t]  # the most important keep every expert
        elif mask[t]:
            assert len(after[t]) == 1  # β = 1: the others keep their first expert only


@pytest.mark.parametrize("name", ["moekit", "qwen3_moe", "gpt_oss"])
def test_importance_that_selects_no_token_leaves_the_outputs_bit_identical(models, name):
    """Fractions too small to select a token still ask the attention for its probabilities: the
    extra path must not move the outputs by a bit."""
    model = models(name)
    ids, real = prompt(model)
    base, _ = routed(model, ids, real, odp_overrides(0.5))
    same, record = routed(model, ids, real, odp_overrides(0.5, skip_fraction=0.05, protect_fraction=0.05))
    assert IMPORTANCE_KEY in record.extras  # importance was computed, and selected nothing
    assert torch.equal(same, base)
    new_tokens = generate(model, ids[:1], max_new_tokens=4)
    with override_routing(model, RoutingOverride(skip_fraction=0.05)):
        assert torch.equal(generate(model, ids[:1], max_new_tokens=4), new_tokens)


def test_generation_prunes_the_prompt_and_leaves_decoding_steps_to_the_weight_rule(models):
    model = models("moekit")
    ids = prompt(model)[0][:1]
    capture = RoutingCapture()
    odp = odp_overrides(0.0, skip_fraction=0.5)
    with override_routing(model, Overrides(odp.layers, odp.default, capture)):
        generate(model, ids, max_new_tokens=3)
    prefill, *steps = capture.routings[0]
    assert int((prefill.experts_per_token() == 0).sum()) == 5  # half of the 10 prompt tokens
    assert steps and all(r.num_tokens == 1 and int(r.experts_per_token()[0]) == 2 for r in steps)


def test_bad_values_name_the_parameter():
    for kwargs, field in [
        (dict(skip_fraction=1.5), "skip_fraction"),
        (dict(protect_fraction=-0.1), "protect_fraction"),
        (dict(skipped_top_k=-1), "skipped_top_k"),
        (dict(importance="entropy"), "importance"),
    ]:
        with pytest.raises(ConfigError, match=field):
            odp_overrides(0.5, **kwargs)
    with pytest.raises(ConfigError, match="threshold"):
        odp_overrides(2.0)


def test_attention_experts_give_no_probabilities_so_importance_is_the_released_score():
    from dataclasses import replace

    from moekit.models.attention_experts import AttentionExpertsConfig

    base = tiny_lm()
    config = replace(base.config, attention_experts=AttentionExpertsConfig(2, top_k=1))
    torch.manual_seed(0)
    model = LanguageModel(config).eval()
    ids, real = prompt(model)
    scores = {}
    for importance in ("attention", "position"):
        _, record = routed(model, ids, real, odp_overrides(0.0, skip_fraction=0.3, importance=importance))
        scores[importance] = record.extras[IMPORTANCE_KEY]
        assert int(((record.experts_per_token() == 0) & real.reshape(-1)).sum()) == 3 + 2
    assert torch.equal(scores["attention"], scores["position"])
