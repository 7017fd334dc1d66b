"""KV-cached generation: transformers' tokens for every family, cached logits equal a full forward,
left-padded batches, sliding windows, sampling filters and the inputs it refuses."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import torch_threads
from moekit.errors import MoekitError
from moekit.inference.generate import filter_logits, generate, stream
from moekit.inference.kv_cache import KVCache
from moekit.layer import MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.spec import preset

transformers = pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
from moekit.interop.hf import from_hf  # noqa: E402
from moekit.interop.tiny import TINY_CONFIGS, tiny_model  # noqa: E402

FAMILIES = list(TINY_CONFIGS)
NEW = 9  # odd sizes: prompts of 7, 4 and 2 real tokens, 9 new tokens


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """family -> (transformers model, the same checkpoint loaded by moekit)."""
    cache = {}

    def get(family):
        if family not in cache:
            hf = tiny_model(family, seed=1)
            folder = tmp_path_factory.mktemp(family)
            hf.save_pretrained(folder)
            cache[family] = (hf, from_hf(folder))
        return cache[family]

    return get


def padded_prompts(vocab=128, lengths=(7, 4, 2), seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(pair, family):
    hf, ours = pair(family)
    ids, mask = padded_prompts()
    eos = hf.generation_config.eos_token_id  # transformers stops at the config's eos: so do we
    mine = generate(ours, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        theirs = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    assert mine.shape == (3, ids.shape[1] + NEW)
    assert torch.equal(mine, theirs)


def cached_step_logits(model, ids, mask, tokens):
    """Logits of the prompt's last position and of every fed-back token, through the cache."""
    cache = model.new_cache()
    real = mask.bool()
    positions = (mask.cumsum(-1) - 1).masked_fill(~real, 1)
    steps = [model(ids, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]]
    for i in range(tokens.shape[1] - 1):
        positions = positions[:, -1:] + 1
        step = tokens[:, i : i + 1]
        steps.append(
            model(step, attention_mask=torch.ones_like(step), position_ids=positions, cache=cache).logits[
                :, -1
            ]
        )
    return torch.stack(steps, dim=1), cache


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_equal_a_full_forward(pair, family):
    _, model = pair(family)
    ids, mask = padded_prompts(seed=1)
    out = generate(model, ids, mask, max_new_tokens=NEW)
    tokens = out[:, ids.shape[1] :]
    full_mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
    with torch.no_grad():
        full = model(out, attention_mask=full_mask, position_ids=positions).logits[:, ids.shape[1] - 1 : -1]
        cached, cache = cached_step_logits(model, ids, mask, tokens)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    for layer, kv in zip(model.layers, cache.layers, strict=True):  # windows keep only their window
        expected = out.shape[1] - 1 if layer.window is None else min(layer.window - 1, out.shape[1] - 1)
        assert kv.keys.shape[2] == expected


def test_sliding_window_families_are_exercised_past_their_window(pair):
    for family in ("mixtral", "gpt_oss", "qwen2_moe"):
        _, model = pair(family)
        windows = [layer.window for layer in model.layers if layer.window is not None]
        assert windows and max(windows) < 7 + NEW


def tiny_lm(router_kind="token_choice", seed=0, **moe_options):
    torch.manual_seed(seed)
    router = preset("qwen3_moe", 8, 2)
    moe = MoEConfig(hidden_size=32, ff_size=16, router=router, router_kind=router_kind, **moe_options)
    config = LMConfig(
        vocab_size=97,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        ff_size=48,
        max_seq_len=40,
        moe=moe,
        first_dense_layers=1,
        tie_embeddings=False,
    )
    return LanguageModel(config).eval()


def test_language_model_cache_equals_full_forward_and_padding_does_not_change_tokens():
    model = tiny_lm()
    ids, mask = padded_prompts(vocab=97, lengths=(6, 3, 5), seed=2)
    out = generate(model, ids, mask, max_new_tokens=NEW)
    for row in range(3):  # each row alone, without padding, gives the same tokens
        real = ids[row][mask[row].bool()][None]
        alone = generate(model, real, max_new_tokens=NEW)
        assert torch.equal(alone[0, real.shape[1] :], out[row, ids.shape[1] :])
    # without padding, the cache's logits are the full forward's
    prompt = ids[:1, 1:]
    tokens = generate(model, prompt, max_new_tokens=NEW)
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model(prompt, cache=cache).logits[:, -1]]
        for i in range(prompt.shape[1], tokens.shape[1] - 1):
            steps.append(model(tokens[:, i : i + 1], cache=cache).logits[:, -1])
        full = model(tokens).logits[:, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_float64_cache_matches_full_forward_tightly():
    model = tiny_lm(seed=3).double()
    ids = torch.randint(0, 97, (2, 5))
    out = generate(model, ids, max_new_tokens=6)
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model(ids, cache=cache).logits[:, -1]]
        for i in range(5, out.shape[1] - 1):
            steps.append(model(out[:, i : i + 1], cache=cache).logits[:, -1])
        full = model(out).logits[:, 4:-1]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-12, rtol=1e-12)


def test_eos_stops_rows_and_pads_the_finished_ones():
    model = tiny_lm(seed=4)
    ids = torch.randint(0, 97, (2, 4))
    free = generate(model, ids, max_new_tokens=8)
    eos = int(free[0, 5])  # row 0's second new token
    out = generate(model, ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=96)
    first = (out[0, 4:] == eos).nonzero()[0, 0].item()
    assert torch.equal(out[0, 4 : 5 + first], free[0, 4 : 5 + first])
    assert bool((out[0, 5 + first :] == 96).all())
    done = generate(model, ids[:1], max_new_tokens=8, eos_token_id=int(free[0, 4]))
    assert done.shape[1] == 5  # every row finished: generation stops


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_lm(seed=5)
    ids = torch.randint(0, 97, (2, 4))
    a = generate(model, ids, max_new_tokens=6, do_sample=True, temperature=1.5, seed=7)
    b = generate(model, ids, max_new_tokens=6, do_sample=True, temperature=1.5, seed=7)
    assert torch.equal(a, b)
    greedy = generate(model, ids, max_new_tokens=6)
    assert torch.equal(generate(model, ids, max_new_tokens=6, do_sample=True, top_k=1, seed=1), greedy)
    draws = {
        tuple(generate(model, ids[:1], max_new_tokens=4, do_sample=True, temperature=3.0, seed=s)[0].tolist())
        for s in range(6)
    }
    assert len(draws) > 1


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=12, unique=True),
    st.integers(0, 12),
    st.floats(0.05, 1.0),
)
def test_filters_keep_top_k_and_the_smallest_nucleus(values, k, p):
    logits = torch.tensor([values], dtype=torch.float64)
    kept_k = filter_logits(logits, 1.0, k, 1.0).isfinite()
    assert int(kept_k.sum()) == (len(values) if k == 0 or k >= len(values) else k)
    kept = filter_logits(logits, 1.0, 0, p).isfinite()[0]
    probs = logits.softmax(-1)[0]
    mass = float(probs[kept].sum())
    assert mass >= p - 1e-9 or bool(kept.all())
    assert float(probs[kept].min()) >= float(probs[~kept].max()) if (~kept).any() else True
    smaller = mass - float(probs[kept].min())
    assert smaller < p + 1e-9  # dropping the least likely kept token falls short of p


def test_stream_yields_one_token_per_step():
    model = tiny_lm(seed=6)
    ids = torch.randint(0, 97, (2, 3))
    steps = list(stream(model, ids, max_new_tokens=5))
    assert len(steps) == 5 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), generate(model, ids, max_new_tokens=5)[:, 3:])


def test_bad_inputs_are_refused_with_one_clear_error(pair):
    model = tiny_lm()
    with pytest.raises(MoekitError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(MoekitError, match="context of 40"):
        generate(model, torch.zeros(1, 30, dtype=torch.long), max_new_tokens=11)
    with pytest.raises(MoekitError, match="left padding"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, 1, 0]]))
    with pytest.raises(MoekitError, match="vocabulary"):
        generate(model, torch.full((1, 3), 97))
    with pytest.raises(MoekitError, match="max_new_tokens"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=-1)
    with pytest.raises(MoekitError, match="LanguageModel"):
        generate(torch.nn.Linear(2, 2), torch.zeros(1, 3, dtype=torch.long))
    _, family_model = pair("qwen3_moe")
    context = family_model.context_length
    with pytest.raises(MoekitError, match=f"context of {context}"):
        generate(family_model, torch.zeros(1, context, dtype=torch.long), max_new_tokens=1)


def test_offload_without_the_offload_module_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "moekit.inference.offload", None)
    with pytest.raises(MoekitError, match="offload"):
        generate(tiny_lm(), torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, offload=object())


def test_kv_cache_counts_slots_and_bytes():
    cache = KVCache([None, 3])
    k = torch.zeros(1, 2, 5, 4)
    cache.begin(torch.ones(1, 5, dtype=torch.bool))
    for layer in cache.layers:
        layer.update(k, k)
    assert len(cache) == 5 and cache.layers[1].keys.shape[2] == 2 and cache.layers[0].keys.shape[2] == 5
    assert cache.nbytes == (5 + 2) * 2 * 2 * 4 * 4


def test_only_steps_whose_products_can_pay_a_thread_hand_off_are_timed_both_ways():
    """Tiny products run on one thread untimed (a second thread only delays them); a step whose
    largest product reads or computes long enough is timed on one thread and on all."""
    from moekit.inference.generate import threads_may_pay_off

    head = 16384 * 1024  # a 64 MB output head
    assert not threads_may_pay_off(1, 1000, 4)
    assert threads_may_pay_off(1, head, 4) and threads_may_pay_off(8, head, 4)
    assert threads_may_pay_off(4096, 100_000, 4)  # arithmetic-bound (a long prompt)


def test_step_threads_time_both_ways_then_keep_the_faster_and_retry_the_other():
    from moekit.inference.step_threads import RETRY_EVERY, TRIALS, StepTimings

    timings = StepTimings()
    seen = []
    for _ in range(2 * TRIALS):  # trials alternate, all threads first
        threaded = timings.next_threaded()
        seen.append(threaded)
        timings.add(threaded, 1.0 if threaded else 2.0)
    assert seen == [True, False] * TRIALS
    for _ in range(RETRY_EVERY):  # threads measured faster: kept
        assert timings.next_threaded()
        timings.add(True, 1.0)
    assert not timings.next_threaded()  # then one step the other way
    for _ in range(TRIALS):  # one thread turns out faster now: the choice follows
        timings.add(False, 0.5)
    assert not timings.next_threaded()


def test_generation_gives_the_same_tokens_whichever_threads_its_steps_take(monkeypatch):
    """With 2 threads and every step timed both ways (so that consecutive steps alternate between
    one thread and two), the tokens are those of one-thread generation and the cached logits those
    of a full forward, against float64."""
    from moekit.inference import generate as generate_module
    from moekit.inference.step_threads import step_threads_of

    model = tiny_lm(seed=5)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = generate(model, ids, max_new_tokens=NEW)
        torch.set_num_threads(2)
        monkeypatch.setattr(generate_module, "threads_may_pay_off", lambda *size: True)
        both = generate(model, ids, max_new_tokens=NEW)
        timings = step_threads_of(model).by_rows[2]
        assert len(timings.one) and len(timings.all)  # decode steps ran both ways
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(alone, both)
    exact = model.double()
    with torch.no_grad():
        full = exact(both).logits[:, ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(full, both[:, ids.shape[1] :])


def cached_decode_logits(model, ids, tokens):
    """Logits of the prompt's last position and of each fed-back token, through the cache."""
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model(ids, cache=cache).logits[:, -1]]
        for i in range(ids.shape[1], tokens.shape[1] - 1):
            steps.append(model(tokens[:, i : i + 1], cache=cache).logits[:, -1])
    return torch.stack(steps, 1).float()


@pytest.mark.parametrize("family", ["moekit", "qwen3_moe", "deepseek_v3"])
def test_bf16_generation_tracks_fp32_with_routers_in_fp32(family, tmp_path):
    """Under bf16 autocast, generation runs its products in bf16 (the cached logits move off
    fp32's, within bf16's tolerance) while the routers' arithmetic stays fp32."""
    from moekit.routing.override import Overrides, RoutingCapture

    if family == "moekit":
        model = tiny_lm().eval()
    else:
        tiny_model(family).save_pretrained(tmp_path)
        model = from_hf(tmp_path).eval()
    ids = torch.tensor([[5, 9, 2, 7, 3, 11, 4]])
    tokens = generate(model, ids, max_new_tokens=5)
    fp32 = cached_decode_logits(model, ids, tokens)
    capture = RoutingCapture()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = generate(model, ids, max_new_tokens=5, overrides=Overrides(capture=capture))
        bf16 = cached_decode_logits(model, ids, tokens)
    assert in_bf16.shape == tokens.shape
    scores = [r.logits for routings in capture.routings.values() for r in routings]
    assert scores and all(s.dtype == torch.float32 for s in scores)
    assert not torch.equal(fp32, bf16)
    assert (fp32 - bf16).abs().max() <= 0.05 * fp32.abs().max() + 1e-3


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    capacity=st.one_of(st.none(), st.integers(1, 12)),
    window=st.one_of(st.none(), st.integers(2, 6)),
)
def test_kv_cache_buffers_hold_what_concatenation_would(steps, capacity, window):
    """Preallocated (and grown) buffers return exactly the keys of concatenating every step, cut
    to the window where there is one; a capacity too small or unknown only changes allocation."""
    layer = KVCache([window], capacity).layers[0]
    gen = torch.Generator().manual_seed(len(steps))
    everything_k, everything_v = torch.zeros(2, 3, 0, 4), torch.zeros(2, 3, 0, 5)
    for s in steps:
        k, v = torch.randn(2, 3, s, 4, generator=gen), torch.randn(2, 3, s, 5, generator=gen)
        start = everything_k.shape[2]
        everything_k, everything_v = torch.cat([everything_k, k], 2), torch.cat([everything_v, v], 2)
        keys, values = layer.update(k, v)
        first = layer.first_key_slot(start)
        assert torch.equal(keys, everything_k[:, :, first:])
        assert torch.equal(values, everything_v[:, :, first:])
    kept = everything_k.shape[2] if window is None else min(window - 1, everything_k.shape[2])
    assert torch.equal(layer.keys, everything_k[:, :, everything_k.shape[2] - kept :])
    assert layer.length == sum(steps)


def test_one_token_step_masks_equal_the_causal_window_and_padding_rule():
    """The mask of a one-token step (a view of the padding) is the general rule's: causal, inside
    the window, real keys only; with no padding at all it is skipped (None) unless materialised."""
    from moekit.inference.kv_cache import step_mask

    plain = KVCache([None])
    plain.begin(torch.ones(2, 4, dtype=torch.bool))
    start = plain.begin((2, 1))
    assert plain.all_real and step_mask(plain, start, None, None, materialise=False) is None
    assert step_mask(plain, start, None, None, materialise=True).all()

    cache = KVCache([None, 3], capacity=3)  # grown past its capacity below
    prompt = torch.tensor([[False, False, True, True], [True, True, True, True]])
    cache.begin(prompt)
    for _ in range(3):
        start = cache.begin((2, 1))
        end = cache.length
        padding = torch.cat([prompt, torch.ones(2, end - 4, dtype=torch.bool)], 1)
        for window in (None, 3):
            first = 0 if window is None else max(0, start - (window - 1))
            key = torch.arange(first, end)
            rule = (key <= start) & ((key > start - window) if window else True) & padding[:, first:end]
            mask = step_mask(cache, start, window, None, materialise=False)
            assert mask.shape == (2, 1, 1, end - first) and torch.equal(mask[:, 0, 0], rule)
    assert not cache.all_real


def test_generation_leaves_the_model_trainable(pair):
    """Generation runs in inference mode; what it caches on the model (RoPE's frequencies) stays
    a normal tensor, so a training step with gradients works after it."""
    _, model = pair("qwen3_moe")
    ids, mask = padded_prompts(seed=3)
    generate(model, ids, mask, max_new_tokens=2)
    model.train()
    try:
        model(ids, attention_mask=mask).logits.sum().backward()
        assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kernel", ["tile", "mm"])
def test_a_batch_prompt_runs_its_threaded_expert_loops_in_inference_mode(pair, monkeypatch, kernel):
    """The prompt's step runs in inference mode like the decode steps, also where its experts take
    the many-token path on two threads, as a batch-8 prompt of a Qwen3-MoE model loaded by
    `from_hf` does: the C++ loops' threads write into inference tensors (torch's `at::mm` among
    them, with `kernel` "mm"). Its tokens are those of a full float64 forward."""
    from moekit.dispatch import grouped
    from moekit.inference import generate as generate_module
    from moekit.kernels.native import native_available

    _, model = pair("qwen3_moe")
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(7))
    monkeypatch.setenv("MOEKIT_NATIVE", kernel)
    monkeypatch.setattr(generate_module, "threads_may_pay_off", lambda *size: True)
    planned = []
    original = grouped.plan_experts

    def recording(*args, **kwargs):
        plan = original(*args, **kwargs)
        loops = plan.loops
        planned.append((plan.path, getattr(loops, "kernel", None), getattr(loops, "threads", None)))
        planned[-1] += (torch.is_inference_mode_enabled(),)
        return plan

    monkeypatch.setattr(grouped, "plan_experts", recording)
    model.__dict__.pop("_step_threads", None)  # the prompt's step is then timed on all threads first
    with torch_threads(2):
        tokens = generate(model, ids, max_new_tokens=3)
    prompt_calls = planned[: len(model.moe_layers)]
    expected_kernel = kernel if kernel == "mm" or native_available() else "mm"
    assert prompt_calls == [("many_tokens", expected_kernel, 2, True)] * len(model.moe_layers)
    with torch.no_grad():
        full = model.double()(tokens).logits[:, ids.shape[1] - 1 : -1].argmax(-1)
    model.float()
    assert torch.equal(full, tokens[:, ids.shape[1] :])
