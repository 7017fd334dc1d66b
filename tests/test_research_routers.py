"""Expert-choice, hash, recurrent (RMoE #16), stochastic (THOR #33), cosine (#18/#23) and
chain-of-experts (#25) routing, each held to the property that defines it."""

import math

import pytest
import torch

from moekit.errors import MoekitError
from moekit.layer import MoE, MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.expert_choice import expert_choice_capacity
from moekit.routing.recurrent import STATE_KEY, tie_recurrent_cells
from moekit.routing.spec import RouterSpec

HIDDEN, FF = 16, 8


def make_config(kind, options, num_experts, top_k, **spec):
    return MoEConfig(
        hidden_size=HIDDEN,
        ff_size=FF,
        router=RouterSpec(num_experts=num_experts, top_k=top_k, **spec),
        router_kind=kind,
        router_options=options,
        backend="loop",
    )


def make_layer(kind, options, num_experts, top_k, **spec):
    return MoE(make_config(kind, options, num_experts, top_k, **spec))


# ---- expert choice -----------------------------------------------------------------------------


def test_expert_choice_every_expert_takes_exactly_its_capacity_of_its_best_tokens():
    torch.manual_seed(0)
    layer = make_layer("expert_choice", {"capacity_factor": 1.5}, 6, 2)
    x = torch.randn(50, HIDDEN)
    mask = torch.rand(50) > 0.3
    _, routing = layer.forward_with_routing(x, mask)
    num_real = int(mask.sum())
    capacity = math.ceil(1.5 * 2 * num_real / 6)
    assert expert_choice_capacity(num_real, 6, 2, 1.5) == capacity
    assert routing.counts.tolist() == [capacity] * 6
    assert bool(mask[routing.kept.token].all())  # padding is never chosen
    for e in range(6):
        mine = routing.kept.token[routing.kept.expert == e]
        others = torch.ones(50, dtype=torch.bool)
        others[mine] = False
        others &= mask
        assert routing.scores[mine, e].min() >= routing.scores[others, e].max()
        # rank is the place in the expert's own order
        order = routing.kept.rank[routing.kept.expert == e]
        assert sorted(order.tolist()) == list(range(capacity))
        best = mine[order == 0]
        assert routing.scores[best, e] == routing.scores[mine, e].max()


def test_expert_choice_capacity_never_exceeds_the_tokens():
    layer = make_layer("expert_choice", {"capacity_factor": 4.0}, 4, 2)
    _, routing = layer.forward_with_routing(torch.randn(5, HIDDEN))
    assert routing.counts.tolist() == [5] * 4


# ---- hash routing ------------------------------------------------------------------------------


def test_hash_routing_depends_on_the_token_id_only():
    layer = make_layer("hash", {"vocab_size": 30, "seed": 3}, 8, 2)
    ids = torch.tensor([[1, 5, 7, 5, 29, 1]])
    _, a = layer.forward_with_routing(torch.randn(1, 6, HIDDEN), token_ids=ids)
    _, b = layer.forward_with_routing(torch.randn(1, 6, HIDDEN) * 10, token_ids=ids)
    for left, right in ((a.kept.token, b.kept.token), (a.kept.expert, b.kept.expert)):
        assert torch.equal(left, right)

    def experts_of(routing, t):
        return sorted(routing.kept.expert[routing.kept.token == t].tolist())

    assert experts_of(a, 1) == experts_of(a, 3)  # id 5 twice
    assert experts_of(a, 0) == experts_of(a, 5)  # id 1 twice
    assert all(len(set(experts_of(a, t))) == 2 for t in range(6))
    again = make_layer("hash", {"vocab_size": 30, "seed": 3}, 8, 2)
    assert torch.equal(again.router.table, layer.router.table)  # a fixed function of the seed
    assert not torch.equal(
        make_layer("hash", {"vocab_size": 30, "seed": 4}, 8, 2).router.table, layer.router.table
    )


def test_hash_routing_needs_valid_token_ids():
    layer = make_layer("hash", {"vocab_size": 10}, 4, 1)
    with pytest.raises(MoekitError, match="token_ids"):
        layer.forward_with_routing(torch.randn(3, HIDDEN))
    with pytest.raises(MoekitError, match="vocab_size"):
        layer.forward_with_routing(torch.randn(3, HIDDEN), token_ids=torch.tensor([0, 1, 10]))


# ---- recurrent router (RMoE, #16) --------------------------------------------------------------


def test_recurrent_cell_is_the_gru_of_the_paper():
    layer = make_layer("recurrent", {"state_size": 6}, 4, 2)
    cell = layer.router.cell
    reference = torch.nn.GRUCell(6, 6)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(reference, name).copy_(getattr(cell, name.replace("weight", "w").replace("bias", "b")))
    x, r = torch.randn(5, 6), torch.randn(5, 6)
    torch.testing.assert_close(cell(x, r), reference(x, r))


def test_recurrent_state_depends_on_the_previous_layer_and_carries_gradient_back():
    torch.manual_seed(1)
    config = make_config("recurrent", {"state_size": 8}, 6, 2)
    first, second = MoE(config).double(), MoE(config).double()
    x1 = torch.randn(40, HIDDEN, dtype=torch.float64)
    x2 = torch.randn(40, HIDDEN, dtype=torch.float64)  # independent of the first layer's output
    _, routing1 = first.forward_with_routing(x1)
    y2, routing2 = second.forward_with_routing(x2, previous=routing1)
    _, alone = second.forward_with_routing(x2)
    assert not torch.allclose(routing2.extras[STATE_KEY], alone.extras[STATE_KEY])
    assert not torch.equal(routing2.logits, alone.logits)
    y2.square().sum().backward()
    grad = first.router.proj_in.grad
    assert grad is not None and grad.abs().sum() > 0  # reached W1 of layer 1 through r_1 only
    first.zero_grad()
    second(x2).square().sum().backward()
    assert first.router.proj_in.grad is None or first.router.proj_in.grad.abs().sum() == 0


def test_language_model_shares_one_cell_once_tied_and_threads_the_state():
    torch.manual_seed(2)
    moe = MoEConfig(
        hidden_size=32,
        ff_size=16,
        router=RouterSpec(num_experts=4, top_k=2),
        router_kind="recurrent",
        router_options={"state_size": 8},
    )
    config = LMConfig(
        vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, ff_size=32, max_seq_len=8, moe=moe
    )
    model = LanguageModel(config)
    assert tie_recurrent_cells(model) == 3
    cells = {id(layer.router.cell) for layer in model.moe_layers}
    assert len(cells) == 1
    out = model(torch.randint(0, 40, (2, 8)))
    out.logits.square().mean().backward()
    assert model.moe_layers[0].router.proj_in.grad.abs().sum() > 0
    states = [r.extras[STATE_KEY] for r in out.routings]
    assert all(s.shape == (16, 8) for s in states) and not torch.allclose(states[0], states[1])


# ---- stochastic experts (THOR, #33) ------------------------------------------------------------


def test_thor_draws_one_expert_per_batch_in_training_and_per_token_at_inference():
    layer = make_layer("stochastic", {}, 4, 1).train()
    x = torch.randn(64, HIDDEN)
    drawn = []
    for _ in range(200):
        routing = layer.router(x)
        experts = routing.kept.expert.unique()
        assert experts.numel() == 1 and len(routing.kept) == 64
        drawn.append(int(experts))
    frequency = torch.bincount(torch.tensor(drawn), minlength=4).float() / 200
    assert torch.all((frequency - 0.25).abs() < 0.1)  # uniform (3 standard deviations)
    layer.eval()
    _, routing = layer.forward_with_routing(x)
    assert routing.kept.expert.unique().numel() > 1
    with torch.random.fork_rng():
        torch.manual_seed(9)
        first = layer.forward_with_routing(x)[0]
    with torch.random.fork_rng():
        torch.manual_seed(9)
        again = layer.forward_with_routing(x)[0]
    assert torch.equal(first, again)


# ---- cosine / prototype routing ----------------------------------------------------------------


@pytest.mark.parametrize("dim", [None, 5])
def test_cosine_routing_ignores_the_scale_of_the_hidden_state(dim):
    torch.manual_seed(3)
    layer = make_layer("cosine", {"dim": dim, "temperature": 0.1}, 6, 2, renorm="sum")
    x = torch.randn(30, HIDDEN)
    _, base = layer.forward_with_routing(x)
    assert base.logits.abs().max() <= 1 / 0.1 + 1e-4
    for scale in (1e-3, 0.37, 250.0):
        _, scaled = layer.forward_with_routing(x * scale)
        assert torch.equal(scaled.kept.expert, base.kept.expert) and torch.equal(
            scaled.kept.token, base.kept.token
        )
        torch.testing.assert_close(scaled.kept.weight, base.kept.weight)


def test_cosine_prototypes_attract_their_own_direction():
    layer = make_layer("cosine", {}, 4, 1)
    prototypes = torch.randn(4, HIDDEN)
    layer.router.set_prototypes(prototypes)
    _, routing = layer.forward_with_routing(prototypes * 3.0)
    assert routing.top1_expert().tolist() == [0, 1, 2, 3]


# ---- chain-of-experts (#25) --------------------------------------------------------------------


def test_chain_runs_c_iterations_of_k_over_c_experts_with_an_inner_residual():
    torch.manual_seed(4)
    layer = make_layer("chain", {"iterations": 2}, 8, 4).double()
    x = torch.randn(20, HIDDEN, dtype=torch.float64)
    mask = torch.rand(20) > 0.2
    y, routing = layer.forward_with_routing(x, mask)
    real = int(mask.sum())
    assert torch.all(routing.experts_per_token()[mask] == 4) and torch.all(
        routing.experts_per_token()[~mask] == 0
    )
    iteration = routing.extras["kept_iteration"]
    assert torch.bincount(iteration).tolist() == [2 * real, 2 * real]
    # the same computation written out: x1 = x0 + sum g1 E(x0), x2 = x1 + sum g2 E(x1), y = x2 - x0
    state = x
    for t, router in enumerate(layer.router.routers):
        step = router(state, mask)
        assert torch.all(step.experts_per_token()[mask] == 2)
        update = torch.zeros_like(state)
        for token, expert, weight in zip(step.kept.token, step.kept.expert, step.kept.weight, strict=True):
            update[token] += weight * layer.experts.expert_forward(int(expert), state[token : token + 1])[0]
        state = state + update
        mine = iteration == t
        assert torch.equal(routing.kept.expert[mine].sort().values, step.kept.expert.sort().values)
    torch.testing.assert_close(y, state - x)


def test_chain_with_one_iteration_is_a_standard_moe_layer():
    torch.manual_seed(5)
    chain = make_layer("chain", {"iterations": 1}, 6, 2)
    plain = make_layer("token_choice", {}, 6, 2)
    plain.router.load_state_dict(chain.router.routers[0].state_dict())
    plain.experts.load_state_dict(chain.experts.state_dict())
    x = torch.randn(25, HIDDEN)
    torch.testing.assert_close(chain(x), plain(x))


def test_chain_ablations_change_the_computation():
    torch.manual_seed(6)
    base = make_layer("chain", {"iterations": 2}, 6, 2)
    no_residual = make_layer("chain", {"iterations": 2, "inner_residual": False}, 6, 2)
    no_residual.load_state_dict(base.state_dict())
    shared = make_layer("chain", {"iterations": 2, "shared_router": True}, 6, 2)
    assert len(shared.router.routers) == 1 and len(base.router.routers) == 2
    x = torch.randn(10, HIDDEN)
    assert not torch.allclose(base(x), no_residual(x))
