"""Experts streamed from disk: bit-identical to in memory for every family and layout, the cache
policies agree with the cache simulator, prefetch and `auto` act, bad budgets are refused."""

import json
import threading

import pytest
import torch

pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)

from moekit.analysis.cache import simulate_cache  # noqa: E402
from moekit.analysis.cli import load_moekit_model  # noqa: E402
from moekit.errors import ConfigError, MoekitError  # noqa: E402
from moekit.experts.packed import PackedExperts  # noqa: E402
from moekit.inference.offload import OffloadConfig, attach, parse_budget  # noqa: E402
from moekit.interop.hf import from_hf, load_family, save_family  # noqa: E402
from moekit.interop.tiny import TINY_CONFIGS, tiny_model  # noqa: E402
from moekit.layer import MoEConfig  # noqa: E402
from moekit.models.lm import LanguageModel, LMConfig  # noqa: E402
from moekit.routing.spec import preset  # noqa: E402
from moekit.train.checkpoint import save_checkpoint  # noqa: E402

LAYOUTS = {"per_expert": True, "packed": False}  # save_pretrained(save_original_format=...)
POLICIES = ("lru", "lfu", "pinned", "auto")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(family, layout, overrides) -> an HF folder of a tiny random model, built once."""
    cache = {}

    def get(family, layout="packed", seed=1, **overrides):
        key = (family, layout, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{family}_{layout}")
            model = tiny_model(family, seed=seed, **overrides)
            model.save_pretrained(path, save_original_format=LAYOUTS[layout])
            cache[key] = path
        return cache[key]

    return get


def _batch(seq=11):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (3, seq), generator=gen)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    return ids, mask


def _greedy(model, ids, steps):
    """Greedy decoding by full forwards (no KV cache): exact tokens to compare."""
    for _ in range(steps):
        next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


def _min_budget(model):
    """The smallest budget whose equal split holds top-k experts in every MoE layer."""
    need = []
    for moe in model.moe_layers:
        e = moe.experts
        per_expert = sum(p[0].nbytes for p in (e.w_in, e.w_out, e.b_in, e.b_out) if p is not None)
        need.append(moe.config.router.top_k * per_expert)
    return max(need) * len(need)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", TINY_CONFIGS)
def test_every_expert_read_from_disk_equals_the_loaded_one(folder, family, layout):
    model = from_hf(folder(family, layout))
    with attach(model, OffloadConfig(budget_bytes="100%", prefetch=False)) as handle:
        for i, original in enumerate(handle._originals):
            for e in range(original.num_experts):
                disk = handle._read(i, e)
                for name, tensor in disk.items():
                    assert torch.equal(tensor, getattr(original, name)[e]), (family, layout, i, e, name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", TINY_CONFIGS)
def test_offloaded_forward_and_greedy_tokens_are_bit_identical(folder, family, layout):
    model = from_hf(folder(family, layout))
    ids, mask = _batch()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        tokens = _greedy(model, ids[:1, :5], 6)
        for policy in POLICIES:
            # the smallest budget: every call evicts, and a prompt overflows the slots for a moment
            config = OffloadConfig(budget_bytes=_min_budget(model), policy=policy)
            with attach(model, config) as handle:
                assert torch.equal(model(ids, attention_mask=mask).logits, reference), policy
                assert torch.equal(_greedy(model, ids[:1, :5], 6), tokens), policy
            report = handle.report()
            assert report["requests"] > 0 and report["bytes_read"] > 0
            assert all(layer["slots"] >= moe.config.router.top_k for layer, moe in zip(
                report["layers"], model.moe_layers, strict=True))  # fmt: skip
    assert all(type(moe.experts) is PackedExperts for moe in model.moe_layers)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, reference)


def test_bit_identical_on_two_threads_where_the_kernels_use_workers(folder):
    model = from_hf(folder("qwen3_moe", "packed"))
    ids, mask = _batch(seq=7)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            reference = model(ids, attention_mask=mask).logits
            step = model(ids[:1, :1]).logits
            with attach(model, OffloadConfig(budget_bytes="30%")):
                assert torch.equal(model(ids, attention_mask=mask).logits, reference)
                assert torch.equal(model(ids[:1, :1]).logits, step)
    finally:
        torch.set_num_threads(threads)


def _decode_stream(model, steps=60):
    """Single-token forwards (the expert traffic of KV-cached decoding, one token per step)."""
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for token in torch.randint(0, 128, (steps,), generator=gen).tolist():
            model(torch.tensor([[token]]))


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_demand_cache_hits_equal_the_simulator_and_never_beat_belady(folder, policy):
    model = from_hf(folder("mixtral", "packed", num_experts_per_tok=1, num_local_experts=8))
    with attach(model, OffloadConfig(budget_bytes="40%", policy=policy, prefetch=False)) as handle:
        _decode_stream(model)
    report = handle.report()
    for stats, layer in zip(handle.stats, report["layers"], strict=True):
        assert layer["requests"] == 60
        assert layer["hits"] == simulate_cache(stats.trace, layer["slots"], policy)
        assert layer["hits"] <= layer["belady_hits"]
    assert 0 < report["hit_rate"] < 1
    assert 0 < report["peak_resident_expert_bytes"] <= report["budget_bytes"]  # decode never overflows
    assert report["bytes_read_per_token"] >= report["belady_bytes_read_per_token"]
    json.dumps(report, allow_nan=False)


def test_prefetch_reads_next_layer_experts_in_a_thread_and_turns_misses_into_hits(folder):
    model = from_hf(folder("qwen3_moe", "packed"))
    reports = {}
    for prefetch in (False, True):
        with attach(model, OffloadConfig(budget_bytes="30%", prefetch=prefetch)) as handle:
            _decode_stream(model, 40)
            running = any(t.name.startswith("moekit-prefetch") for t in threading.enumerate())
            assert running == prefetch
        reports[prefetch] = handle.report()
    assert reports[False]["prefetch_issued"] == 0
    on = reports[True]
    assert on["prefetch_issued"] > 0 and on["prefetch_hits"] > 0
    assert on["hit_rate"] > reports[False]["hit_rate"]
    assert not any(t.name.startswith("moekit-prefetch") for t in threading.enumerate())  # joined


def test_pinned_keeps_the_warm_up_s_most_requested_experts(folder):
    model = from_hf(folder("qwen3_moe", "packed"))
    with attach(model, OffloadConfig(budget_bytes="50%", policy="pinned", prefetch=False)) as handle:
        _decode_stream(model, 50)
        for cache, k in zip(handle.caches, handle.top_k, strict=True):
            assert len(cache.pinned) == cache.slots - k > 0
            assert cache.pinned <= set(cache.entries)  # never evicted after the warm-up
            assert cache.policy == "pinned"


def test_auto_gives_slots_where_the_simulator_finds_hits_and_picks_the_better_policy(folder):
    model = from_hf(folder("qwen3_moe", "packed"))
    with attach(model, OffloadConfig(budget_bytes="50%", policy="auto", prefetch=False)) as handle:
        # layer 0 alternates two experts (consistent routing), layer 1 picks any of the eight
        handle.stats[0].trace = [0, 1] * 40
        handle.stats[1].trace = torch.randint(
            0, 8, (200,), generator=torch.Generator().manual_seed(0)
        ).tolist()
        handle._auto_plan()
        slots = [c.slots for c in handle.caches]
        assert slots[0] == handle.top_k[0] == 2 and slots[1] == 6
        assert sum(s * b for s, b in zip(slots, handle.expert_bytes, strict=True)) <= handle.budget
        assert handle.plans[-1]["slots"] == slots
    with attach(model, OffloadConfig(budget_bytes="25%", policy="auto", prefetch=False)) as handle:
        # a hot pair between scans: LFU keeps the pair, LRU loses it
        scan = [0, 1, 0, 1, 2, 3, 4, 5] * 10
        handle.stats[0].trace = handle.stats[1].trace = scan
        handle._auto_plan()
        assert [c.slots for c in handle.caches] == [2, 2]
        assert simulate_cache(scan, 2, "lfu") > simulate_cache(scan, 2, "lru")
        assert handle.policy == "lfu" and all(c.policy == "lfu" for c in handle.caches)
        _decode_stream(model, 40)  # runs under the plan, and re-plans after the warm-up
    report = handle.report()
    assert len(report["plans"]) == 2 and report["plans"][1]["tokens"] >= 32


def test_family_checkpoint_and_moekit_run_directory(tmp_path, folder):
    family = save_family(from_hf(folder("olmoe", "packed")), tmp_path / "family")
    router = preset("qwen3_moe", 8, 2).with_(capacity_factor=1.0)
    config = LMConfig(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, ff_size=64, max_seq_len=64,
        moe=MoEConfig(hidden_size=32, ff_size=32, router=router),
    )  # fmt: skip
    state = {"config": {"model": config.to_dict(), "data": {}}, "step": 0}
    save_checkpoint(tmp_path / "run" / "checkpoints" / "step-0", LanguageModel(config).eval(), None, state)
    ids, _ = _batch()
    for model in (load_family(family), load_moekit_model(tmp_path / "run")[0].eval()):
        with torch.no_grad():
            reference = model(ids).logits
            with attach(model, OffloadConfig(budget_bytes="40%")):
                assert torch.equal(model(ids).logits, reference)


def test_budget_smaller_than_one_token_s_experts_is_refused_naming_it(folder):
    model = from_hf(folder("mixtral", "packed"))
    enough = _min_budget(model)
    with pytest.raises(MoekitError, match=r"offload.budget_bytes: .*one token needs 2"):
        attach(model, OffloadConfig(budget_bytes=enough - 1))
    with pytest.raises(MoekitError, match="'1%'"):
        attach(model, OffloadConfig(budget_bytes="1%"))
    attach(model, OffloadConfig(budget_bytes=enough)).detach()
    assert all(type(moe.experts) is PackedExperts for moe in model.moe_layers)


def test_a_source_that_is_not_the_model_s_checkpoint_is_refused(folder):
    model = from_hf(folder("mixtral", "packed"))
    with pytest.raises(MoekitError, match="differs from the model's"):
        attach(model, OffloadConfig(budget_bytes="50%", source=folder("mixtral", "packed", seed=2)))


@pytest.mark.parametrize(
    "text, expected",
    [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("4096", 4096), ("1.5 kb", 1500), ("25%", 0.25), (7, 7)],
)
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "2XB", "0", "-1GB", "150%", "0%", 0, True, 1.5])
def test_parse_budget_refuses_junk_naming_the_field(text):
    with pytest.raises(ConfigError, match="offload.budget_bytes"):
        parse_budget(text)


def test_config_checks_policy():
    with pytest.raises(ConfigError, match="offload.policy"):
        OffloadConfig(budget_bytes="1GB", policy="fifo")


@pytest.mark.parametrize(
    "family, layout", [("qwen2_moe", "per_expert"), ("gpt_oss", "packed"), ("dbrx", "packed")]
)
def test_a_model_loaded_without_its_experts_runs_offloaded_bit_identically(tmp_path, folder, family, layout):
    path = folder(family, layout)
    ids, mask = _batch()
    in_memory = from_hf(path)
    family_path = save_family(in_memory, tmp_path / "family")
    with torch.no_grad():
        reference = in_memory(ids, attention_mask=mask).logits
        for model in (from_hf(path, experts_on_disk=True), load_family(family_path, experts_on_disk=True)):
            assert all(moe.experts.w_in.is_meta for moe in model.moe_layers)
            assert not any(p.is_meta for n, p in model.named_parameters() if ".experts." not in n)
            with attach(model, OffloadConfig(budget_bytes="50%", policy="lfu")) as handle:
                assert torch.equal(model(ids, attention_mask=mask).logits, reference)
            assert 0 < handle.report()["peak_resident_expert_bytes"] < handle.total_expert_bytes


@pytest.mark.parametrize("source", ["per_expert", "packed", "family"])
def test_stored_rows_are_read_straight_into_the_expert_tensors(tmp_path, folder, source):
    """Where the file's rows are the expert tensors' rows (per-expert and packed HF layouts, moekit's
    own checkpoints), a read needs no assembling: it still equals the model's experts."""
    import dataclasses

    model = from_hf(folder("qwen3_moe", "per_expert" if source == "per_expert" else "packed"))
    config = OffloadConfig(budget_bytes="100%", prefetch=False)
    if source == "family":
        save_family(model, tmp_path / "family")
        config = dataclasses.replace(config, source=tmp_path / "family")
    with attach(model, config) as handle:
        for i, original in enumerate(handle._originals):

            def refuse(parts):
                raise AssertionError("assembled instead of read in place")

            handle.layouts[i] = dataclasses.replace(handle.layouts[i], assemble=refuse)
            for e in (0, original.num_experts - 1):
                for name, tensor in handle._read(i, e).items():
                    assert torch.equal(tensor, getattr(original, name)[e]), (source, i, e, name)


def test_decode_steps_reuse_one_stacking_buffer_and_stay_bit_identical(folder):
    """A decode step (at most top-k experts per layer, no gradients) stacks its experts into a
    buffer reused from step to step; logits and generated tokens stay those of the in-memory model."""
    from moekit.inference.generate import generate

    model = from_hf(folder("qwen3_moe", "per_expert"))
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        reference_logits = model(ids[:, :1]).logits
    reference_tokens = generate(model, ids, max_new_tokens=8)
    with attach(model, OffloadConfig(budget_bytes=_min_budget(model), policy="lru")) as handle:
        with torch.inference_mode():
            assert torch.equal(model(ids[:, :1]).logits, reference_logits)
        assert handle._staging, "a one-token forward should stack into the reused buffer"
        buffers = {key: t.data_ptr() for key, t in handle._staging.items()}
        assert torch.equal(generate(model, ids, max_new_tokens=8), reference_tokens)
        assert {key: t.data_ptr() for key, t in handle._staging.items()} == buffers
