"""What transformers' own model tests check, on models passed through `moekit.patch`.

A representative slice of transformers' modeling tests, run on tiny patched models of every
patchable family against the stock model: `torch.compile` with `fullgraph=True` and HF
`generate`'s static KV cache (same tokens as eager, no recompile for a shorter run), a training
loop with gradient checkpointing, save/load, dynamic RoPE configs, DeepSeek-V3's own test config
(top-8 of 8 experts, 1 of 2 groups kept), `set_experts_implementation`, deep copies.

The compile tests use the `aot_eager` backend by default (dynamo traces the whole graph and
AOTAutograd differentiates it, as with inductor, without inductor's code generation, which takes
minutes on two cores); the inductor versions of every family are marked slow.
"""

import copy

import pytest
import torch

pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
import transformers  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from transformers.generation.configuration_utils import CompileConfig  # noqa: E402

from moekit import MoE, MoEConfig, preset  # noqa: E402
from moekit.dispatch.reference import reference_moe, reference_token_choices  # noqa: E402
from moekit.errors import ConfigError  # noqa: E402
from moekit.interop.patch import PatchedMoE, patch  # noqa: E402
from moekit.interop.tiny import TINY_CONFIGS, tiny_model  # noqa: E402
from moekit.models.lm import LanguageModel, LMConfig  # noqa: E402
from moekit.routing.spec import PRESET_NAMES, RouterSpec  # noqa: E402
from moekit.routing.token_choice import choose_topk  # noqa: E402

PATCHABLE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "granitemoe"]
ATOL = 1e-5
# transformers' DeepseekV3ModelTester routing: every expert chosen, one of two groups kept
DEEPSEEK_HF_TEST_ROUTING = dict(n_routed_experts=8, num_experts_per_tok=8, n_group=2, topk_group=1)


def _batch(batch=3, seq=10, seed=5):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _pair(family, **overrides):
    reference = tiny_model(family, seed=2, **overrides)
    patched = copy.deepcopy(reference)
    patch(patched)
    return reference, patched


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, PatchedMoE)]


def _static_generate(model, ids, mask, new_tokens, compile_backend=None):
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
    if compile_backend is not None:
        config = CompileConfig(fullgraph=True, backend=compile_backend)
        config._compile_all_devices = True  # transformers compiles on GPUs only unless told
        kwargs["compile_config"] = config
    return model.generate(ids, attention_mask=mask, **kwargs)


# --- torch.compile -------------------------------------------------------------------------------


def _check_compiled_generate(family, backend):
    reference, model = _pair(family)
    ids, mask, _ = _batch(batch=2, seq=6)
    torch._dynamo.reset()
    counters.clear()
    expected = _static_generate(reference, ids, mask, 5)
    got = _static_generate(model, ids, mask, 5, compile_backend=backend)
    assert counters["stats"]["unique_graphs"] >= 1  # the decoding steps did run compiled
    assert torch.equal(got, expected)
    graphs = counters["stats"]["unique_graphs"]
    # transformers' test_static_cache_no_recompile_with_smaller_length: a shorter run reuses the graph
    shorter = _static_generate(model, ids, mask, 3, compile_backend=backend)
    assert torch.equal(shorter, expected[:, :-2])
    assert counters["stats"]["unique_graphs"] == graphs
    assert counters["graph_break"] == {}


def test_patched_model_generates_compiled_with_a_static_cache():
    _check_compiled_generate("qwen3_moe", "aot_eager")


def _check_compiled_training_forward(family, backend):
    """Forward (fullgraph) and backward of a padded batch, router logits recorded, against eager."""
    reference, model = _pair(family)
    model.train()
    reference.train()
    ids, mask, labels = _batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    expected = reference(**kwargs)
    expected.loss.backward()
    model(**kwargs)  # transformers installs its output-recording hooks on the first (eager) call
    model.zero_grad()
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True, backend=backend)(**kwargs)
    got.loss.backward()
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    if expected.aux_loss is not None:  # the router logits reached transformers' recorder
        torch.testing.assert_close(got.aux_loss, expected.aux_loss, atol=ATOL, rtol=0)
    named = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, atol=ATOL, rtol=1e-4, msg=name)
    # the records, written from inside the graph, leave the padding out when read
    for block in _blocks(model):
        routing = block.last_routing
        assert torch.equal(routing.token_mask, mask.bool().reshape(-1))
        assert bool(routing.token_mask[routing.kept.token].all())


@pytest.mark.slow
@pytest.mark.parametrize("family", PATCHABLE)
def test_patched_model_trains_compiled_with_inductor(family):
    _check_compiled_training_forward(family, "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("family", PATCHABLE)
def test_patched_model_generates_compiled_with_inductor(family):
    _check_compiled_generate(family, "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("family", PATCHABLE)
def test_patched_model_trains_compiled_aot(family):
    _check_compiled_training_forward(family, "aot_eager")


def test_moekit_layer_compiles_fullgraph_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    layer = MoE(
        MoEConfig(
            hidden_size=32,
            ff_size=16,
            router=preset("deepseek_v3", 8, 3, num_groups=4, topk_groups=2),
            num_shared_experts=1,
        )
    )
    x = torch.randn(2, 9, 32, requires_grad=True)
    expected = layer(x)
    (expected**2).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    grad_x = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    torch._dynamo.reset()
    counters.clear()
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    (got**2).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(x.grad, grad_x, atol=ATOL, rtol=1e-4)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=ATOL, rtol=1e-4, msg=name)


def test_moekit_language_model_compiles_fullgraph_with_the_same_logits_and_gradients():
    torch.manual_seed(0)
    moe = MoEConfig(hidden_size=32, ff_size=16, router=preset("qwen3_moe", 8, 2), num_shared_experts=1)
    config = LMConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ff_size=64, max_seq_len=16, moe=moe
    )
    model = LanguageModel(config)
    ids = torch.randint(0, 64, (2, 12))
    expected = model(ids)
    expected.logits.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    counters.clear()
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids)
    got.logits.square().mean().backward()
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    for a, b in zip(got.routings, expected.routings, strict=True):  # the records come out too
        assert torch.equal(a.kept.expert, b.kept.expert) and torch.equal(a.kept.token, b.kept.token)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=ATOL, rtol=1e-4, msg=name)


def _preset_layer(name: str) -> MoE:
    """A float64 layer in the family's own shape: activation, biases, shared experts, groups."""
    extra = dict(num_groups=4, topk_groups=2) if name == "deepseek_v3" else {}
    spec = preset(name, 8, 1 if name == "llama4" else 2, **extra)
    kwargs = dict(activation="swiglu")
    if name == "gpt_oss":
        kwargs = dict(activation="clamped_swiglu", expert_bias=True, swiglu_limit=1.0)
    if name in ("qwen2_moe", "deepseek_v3", "llama4"):
        kwargs.update(num_shared_experts=1, shared_gate=name == "qwen2_moe")
    layer = MoE(MoEConfig(hidden_size=16, ff_size=12, router=spec, **kwargs)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer.eval()


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("shape,mask", [((3, 7), False), ((3, 7), True), ((2, 1), False)])
def test_compile_path_equals_the_float64_reference(name, shape, mask, monkeypatch):
    """The code the compiler traces (every `is_compiling()` branch taken, run eagerly here in
    float64) against the reference: outputs and every gradient, biases and input weighting too;
    every expert over every token, and (2 tokens: fewer assignments than experts) gathered weights."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layer = _preset_layer(name)
    gen = torch.Generator().manual_seed(len(name))
    x = torch.randn(*shape, 16, generator=gen, dtype=torch.float64)
    token_mask = torch.rand(*shape, generator=gen) > 0.3 if mask else None
    x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = reference_moe(layer, x_ref, token_mask)
    upstream = torch.randn(ref.output.shape, generator=gen, dtype=torch.float64)
    (ref.output * upstream).sum().backward()
    y = layer(x_fast, token_mask)
    (y * upstream).sum().backward()
    torch.testing.assert_close(y, ref.output.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    for pname, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, ref.params[pname].grad, rtol=1e-10, atol=1e-10, msg=pname)


# --- configs transformers accepts ----------------------------------------------------------------


def _dynamic_rope(family):
    theta = TINY_CONFIGS[family].get("rope_parameters", {}).get("rope_theta", 10000.0)
    return {"rope_parameters": {"rope_type": "dynamic", "rope_theta": theta, "factor": 2.0}}


@pytest.mark.parametrize("family", PATCHABLE)
def test_dynamic_rope_does_not_block_patch(family):
    """patch never touches attention: a RoPE type moekit's own attention lacks is no obstacle."""
    overrides = _dynamic_rope(family)
    if family == "deepseek_v3":
        overrides = {**overrides, "max_position_embeddings": 8}  # so that the dynamic scaling acts
    if family == "mixtral":  # transformers' dynamic RoPE reads `head_dim`, which Mixtral leaves None
        overrides = {**overrides, "head_dim": 8}
    reference, model = _pair(family, **overrides)
    ids, mask, _ = _batch(seq=12)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            reference(input_ids=ids, attention_mask=mask).logits,
            atol=ATOL,
            rtol=0,
        )


def test_deepseek_v3_test_config_of_transformers_patches_and_matches():
    reference, model = _pair("deepseek_v3", **DEEPSEEK_HF_TEST_ROUTING)
    reference.train()
    model.train()
    ids, mask, labels = _batch()
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels)
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    expected.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    named = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, atol=ATOL, rtol=1e-4, msg=name)
    for block in _blocks(model):  # every real token went to all 8 experts
        routing = block.last_routing
        assert len(routing.kept) == 8 * int(mask.sum())


@pytest.mark.parametrize("top_k", [5, 6, 8])
def test_group_limited_routing_takes_kept_groups_first_when_they_hold_fewer_than_top_k(top_k):
    spec = RouterSpec(num_experts=8, top_k=top_k, score_fn="sigmoid", num_groups=2, topk_groups=1)
    gen = torch.Generator().manual_seed(top_k)
    logits = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    bias = torch.randn(8, generator=gen, dtype=torch.float64) * 0.3
    _, index, weights = choose_topk(logits, spec, bias)
    for t in range(logits.shape[0]):
        expected = reference_token_choices(logits[t], spec, bias)
        assert index[t].tolist() == [e for e, _ in expected]
        torch.testing.assert_close(weights[t], torch.stack([w for _, w in expected]))
        # the first four come from one group, the kept one
        assert len({e // 4 for e in index[t, :4].tolist()}) == 1


# --- transformers' model-test behaviours, eager ------------------------------------------------


@pytest.mark.parametrize("family", PATCHABLE)
def test_training_loop_with_gradient_checkpointing_matches_stock(family):
    reference, model = _pair(family)
    ids, mask, labels = _batch()
    losses = []
    for m in (reference, model):
        getattr(m, "activation_checkpointing_enable", m.gradient_checkpointing_enable)()
        m.train()
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
        run = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = m(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True).loss
            loss.backward()
            optimizer.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)
    assert losses[0][-1] < losses[0][0]  # the loop trains


@pytest.mark.parametrize("family", PATCHABLE)
def test_save_and_reload_of_a_patched_model(family, tmp_path):
    reference, model = _pair(family)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not _blocks(loaded)  # a plain transformers model
    ids, mask, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits,
            model(input_ids=ids, attention_mask=mask).logits,
            atol=ATOL,
            rtol=0,
        )


@pytest.mark.parametrize("family", PATCHABLE)
def test_set_experts_implementation_warns_instead_of_silence(family):
    reference, model = _pair(family)
    ids, mask, _ = _batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        model.set_experts_implementation("batched_mm")
        with pytest.warns(UserWarning, match="experts_implementation='batched_mm' does not apply"):
            after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_deep_copy_of_a_patched_model_keeps_its_own_padding_hook(family):
    _, model = _pair(family)
    clone = copy.deepcopy(model)
    ids, mask, _ = _batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = clone(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        model(input_ids=ids[:1])  # the original's next call must not change the copy's records
    real = mask.bool().reshape(-1)
    for block in _blocks(clone):
        routing = block.last_routing
        assert torch.equal(routing.token_mask, real)
        assert bool(real[routing.kept.token].all())
        assert block.moe.router.weight is block.gate.weight  # bound to the copy's own parameters


def test_a_refused_moe_setting_is_named():
    """What patch cannot run is refused naming the setting (here the experts' activation)."""
    model = tiny_model("qwen3_moe", hidden_act="gelu")
    with pytest.raises(ConfigError, match="patch: qwen3_moe config hidden_act: got 'gelu'"):
        patch(model)
