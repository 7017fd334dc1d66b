"""Invariants every research router keeps (hypothesis), float64 gradient checks of the learned
routers, config errors that name their field, and every kind inside the language model."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit.errors import ConfigError
from moekit.layer import MoE, MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.factory import ROUTER_KINDS
from moekit.routing.spec import RouterSpec

HIDDEN, FF = 6, 4

# (router_kind, router_options, num_experts, top_k, extra spec axes, shared experts)
ROUTERS = {
    "top_p": ({"p": 0.5}, 5, 5, {}, 0),
    "null_experts": ({"num_null": 3}, 4, 3, {"renorm": "sum"}, 0),
    "dynamic_capacity": ({"p": 0.6, "num_null": 2}, 4, 4, {"renorm": "sum"}, 1),
    "expert_choice": ({"capacity_factor": 1.0}, 4, 2, {}, 0),
    "hash": ({"vocab_size": 20}, 5, 2, {}, 0),
    "recurrent": ({"state_size": 4}, 5, 2, {"renorm": "sum"}, 0),
    "stochastic": ({}, 4, 1, {}, 0),
    "dense_to_sparse": ({"temperature_max": 1.0}, 4, 1, {}, 0),
    "cosine": ({"dim": 3, "temperature": 0.5}, 5, 2, {}, 0),
    "chain": ({"iterations": 2}, 5, 4, {}, 0),
}
LEARNED = [
    "top_p",
    "null_experts",
    "dynamic_capacity",
    "expert_choice",
    "recurrent",
    "dense_to_sparse",
    "cosine",
    "chain",
]


def make_config(kind, experts_kind="packed", experts_options=None, hidden=HIDDEN, **overrides):
    options, num_experts, top_k, spec, shared = ROUTERS[kind]
    return MoEConfig(
        hidden_size=hidden,
        ff_size=FF,
        router=RouterSpec(num_experts=num_experts, top_k=top_k, **spec),
        router_kind=kind,
        router_options=options,
        num_shared_experts=shared,
        experts_kind=experts_kind,
        experts_options=experts_options or {},
        **overrides,
    )


def test_every_router_kind_is_covered():
    assert set(ROUTERS) == set(ROUTER_KINDS) - {"token_choice"}


@given(
    kind=st.sampled_from(sorted(ROUTERS)),
    num_tokens=st.integers(1, 20),
    mask_kind=st.sampled_from(["none", "random", "all_masked"]),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
    training=st.booleans(),
)
def test_routing_invariants(kind, num_tokens, mask_kind, scale, seed, training):
    torch.manual_seed(seed)
    layer = MoE(make_config(kind)).train(training)
    x = torch.randn(num_tokens, HIDDEN) * scale
    ids = torch.randint(0, 20, (num_tokens,))
    mask = None
    if mask_kind == "random":
        mask = torch.rand(num_tokens) > 0.4
    elif mask_kind == "all_masked":
        mask = torch.zeros(num_tokens, dtype=torch.bool)
    y, routing = layer.forward_with_routing(x, mask, token_ids=ids)
    real = routing.token_mask
    kept = routing.kept
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert routing.logits.shape == (num_tokens, routing.num_experts) == routing.scores.shape
    assert torch.isfinite(kept.weight).all()
    # grouped by expert, every id in range, padding gets nothing
    assert torch.all(kept.expert[1:] >= kept.expert[:-1])
    assert bool(((kept.expert >= 0) & (kept.expert < routing.num_experts)).all())
    assert bool(real[kept.token].all()) and bool(real[routing.dropped.token].all())
    # counts add up
    per_token = routing.experts_per_token(compute_only=False)
    assert int(routing.counts.sum()) == len(kept) == int(per_token.sum())
    assert int(routing.chosen_counts.sum()) == len(kept) + len(routing.dropped)
    assert int(routing.experts_per_token().sum()) == len(routing.compute_assignments)
    if kind != "chain":  # chain-of-experts may meet an expert in two iterations
        pairs = list(zip(kept.token.tolist(), kept.expert.tolist(), strict=True))
        assert len(pairs) == len(set(pairs))
    if kind not in ("expert_choice", "chain"):  # each token's ranks are 0..n-1
        for t in kept.token.unique().tolist():
            assert sorted(kept.rank[kept.token == t].tolist()) == list(range(int(per_token[t])))
    if kind not in ("expert_choice",) and mask_kind == "none":
        assert torch.all(per_token >= 1)  # token-choice kinds give every real token a choice
    detached = routing.detach()
    assert not detached.kept.weight.requires_grad and all(
        not v.requires_grad for v in detached.extras.values()
    )


@pytest.mark.parametrize("kind", LEARNED)
def test_router_weights_are_differentiable_in_float64(kind):
    """gradcheck of the layer output against every router parameter (fixed selection and noise)."""
    torch.manual_seed(0)
    layer = MoE(make_config(kind)).double().train()
    x = torch.randn(6, HIDDEN, dtype=torch.float64)
    named = [(n, p) for n, p in layer.named_parameters() if n.startswith("router.")]
    assert named
    params = [p.detach().clone().requires_grad_(True) for _, p in named]

    def output(*values):
        state = {n: v for (n, _), v in zip(named, values, strict=True)}
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return torch.func.functional_call(layer, state, (x,))

    assert torch.autograd.gradcheck(output, params, eps=1e-6, atol=1e-5)
    output(*params).square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("kind", ["hash", "stochastic"])
def test_routers_without_a_gating_network_have_no_parameters(kind):
    layer = MoE(make_config(kind))
    assert not [n for n, _ in layer.named_parameters() if n.startswith("router.")]


@pytest.mark.parametrize(
    "field,kind,options,spec",
    [
        ("moe.router_options.p", "top_p", {"p": 1.5}, {}),
        ("moe.router_options.p", "top_p", {"p": "high"}, {}),
        ("moe.router_options.q", "top_p", {"q": 0.5}, {}),
        ("moe.router.score_fn", "top_p", {}, {"score_fn": "sigmoid"}),
        ("moe.router.selection_bias", "top_p", {}, {"selection_bias": True}),
        ("moe.router_options.num_null", "null_experts", {}, {}),
        ("moe.router_options.num_null", "null_experts", {"num_null": 0}, {}),
        ("moe.router_options.capacity_factor", "expert_choice", {"capacity_factor": 0}, {}),
        ("moe.router.capacity_factor", "expert_choice", {}, {"capacity_factor": 1.0}),
        ("moe.router_options.vocab_size", "hash", {}, {}),
        ("moe.router_options.cell", "recurrent", {"cell": "lstm"}, {}),
        ("moe.router.top_k", "stochastic", {}, {"top_k": 2}),
        ("moe.router_options.temperature_min", "dense_to_sparse", {"temperature_max": 0.4}, {}),
        ("moe.router_options.schedule", "dense_to_sparse", {"schedule": "cosine"}, {}),
        ("moe.router_options.temperature", "cosine", {"temperature": -1}, {}),
        ("moe.router.top_k", "chain", {"iterations": 3}, {"top_k": 4}),
        ("moe.router_options.inner_residual", "chain", {"inner_residual": "yes"}, {}),
    ],
)
def test_router_config_errors_name_the_field(field, kind, options, spec):
    axes = {"num_experts": 4, "top_k": 2 if kind not in ("stochastic", "dense_to_sparse") else 1, **spec}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MoEConfig(
            hidden_size=8, ff_size=4, router=RouterSpec(**axes), router_kind=kind, router_options=options
        )


@pytest.mark.parametrize(
    "field,kind,options,extra",
    [
        ("moe.experts_options.latent_size", "latent", {}, {}),
        ("moe.experts_options.latent_size", "latent", {"latent_size": 9}, {}),
        ("moe.experts_options.rank", "lora", {"rank": 0}, {}),
        ("moe.experts_options.freeze_base", "smora", {"freeze_base": 1}, {}),
        ("moe.experts_options.rank", "smora", {"rank": 2}, {}),
        ("moe.expert_bias", "lora", {}, {"expert_bias": True}),
        ("moe.experts_kind", "mixture", {}, {}),
    ],
)
def test_experts_config_errors_name_the_field(field, kind, options, extra):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MoEConfig(
            hidden_size=8,
            ff_size=4,
            router=RouterSpec(num_experts=4, top_k=2),
            experts_kind=kind,
            experts_options=options,
            **extra,
        )


@pytest.mark.parametrize(
    "kind,experts_kind,experts_options",
    [(k, "packed", None) for k in sorted(ROUTERS) if k != "hash"]
    + [
        ("top_p", "latent", {"latent_size": 8}),
        ("chain", "lora", {"rank": 2}),
        ("null_experts", "smora", {}),
    ],
)
def test_every_kind_trains_inside_the_language_model(kind, experts_kind, experts_options):
    torch.manual_seed(0)
    moe = make_config(kind, experts_kind, experts_options, hidden=16)
    model = LanguageModel(
        LMConfig(vocab_size=20, hidden_size=16, num_layers=2, num_heads=2, ff_size=16, max_seq_len=8, moe=moe)
    )
    ids = torch.randint(0, 20, (2, 8))
    out = model(ids, token_mask=torch.rand(2, 8) > 0.2)
    assert len(out.routings) == 2 and torch.isfinite(out.logits).all()
    torch.nn.functional.cross_entropy(out.logits.reshape(-1, 20), ids.reshape(-1)).backward()
    grads = [p.grad for n, p in model.named_parameters() if "experts" in n and p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_hash_routing_inside_the_language_model():
    torch.manual_seed(0)
    moe = make_config("hash", hidden=16)
    model = LanguageModel(
        LMConfig(vocab_size=20, hidden_size=16, num_layers=2, num_heads=2, ff_size=16, max_seq_len=8, moe=moe)
    )
    ids = torch.randint(0, 20, (2, 8))
    routings = model(ids).routings
    table = model.moe_layers[0].router.table
    for routing in routings:
        for t, token_id in enumerate(ids.reshape(-1).tolist()):
            chosen = sorted(routing.kept.expert[routing.kept.token == t].tolist())
            assert chosen == sorted(table[token_id].tolist())
