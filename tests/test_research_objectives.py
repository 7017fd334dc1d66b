"""The research routers' objectives: each formula's defining property, checked on small routings."""

import pytest
import torch

from moekit.balance.objectives import switch_load_balancing_loss
from moekit.errors import MoekitError
from moekit.layer import MoE, MoEConfig
from moekit.routing.objectives_research import (
    evomoe_balance_loss,
    loramoe_localized_balance_loss,
    null_aware_load_balancing_loss,
    routing_contrastive_loss,
    thor_consistency_loss,
    top_p_entropy_loss,
)
from moekit.routing.record import Assignments, Routing
from moekit.routing.spec import RouterSpec


def routing_from(probs, chosen, num_compute=None, mask=None):
    """A routing with the given [T, E] probabilities and per-token chosen expert lists."""
    num_tokens, num_experts = probs.shape
    token = torch.tensor([t for t, experts in enumerate(chosen) for _ in experts], dtype=torch.long)
    expert = torch.tensor([e for experts in chosen for e in experts], dtype=torch.long)
    rank = torch.tensor([r for experts in chosen for r in range(len(experts))], dtype=torch.long)
    order = torch.argsort(expert, stable=True)
    kept = Assignments(token[order], expert[order], probs[token, expert][order], rank[order])
    mask = torch.ones(num_tokens, dtype=torch.bool) if mask is None else mask
    return Routing(
        probs.log(),
        probs,
        kept,
        Assignments.empty(),
        mask,
        num_compute if num_compute is not None else num_experts,
    )


def test_top_p_entropy_loss_is_the_mean_routing_entropy_of_real_tokens():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25] * 4, [1.0, 0.0, 0.0, 0.0]])
    routing = routing_from(probs, [[0], [1], [0]], mask=torch.tensor([True, True, False]))
    expected = (torch.log(torch.tensor(2.0)) + torch.log(torch.tensor(4.0))) / 2
    torch.testing.assert_close(top_p_entropy_loss(routing), expected)


def test_null_aware_lbl_treats_null_experts_as_interchangeable():
    probs = torch.softmax(torch.randn(6, 6), dim=-1)  # 3 real + 3 null experts
    on_one_null = routing_from(probs, [[0, 3], [1, 3], [2, 3], [0, 3], [1, 3], [2, 3]], num_compute=3)
    spread = routing_from(probs, [[0, 3], [1, 4], [2, 5], [0, 3], [1, 4], [2, 5]], num_compute=3)
    fewer_nulls = routing_from(probs, [[0, 1], [1, 3], [2, 0], [0, 2], [1, 2], [2, 5]], num_compute=3)
    a, b = null_aware_load_balancing_loss(on_one_null), null_aware_load_balancing_loss(spread)
    torch.testing.assert_close(a, b)  # how the null load is spread does not matter...
    assert not torch.allclose(a, null_aware_load_balancing_loss(fewer_nulls))  # ...how much does
    plain = switch_load_balancing_loss(on_one_null.chosen_counts, probs.sum(0), 6)
    assert not torch.allclose(a, plain)


def test_evomoe_balance_loss_is_one_under_uniform_routing_and_grows_with_imbalance():
    probs = torch.full((8, 4), 0.25)
    uniform = routing_from(probs, [[t % 4] for t in range(8)])
    torch.testing.assert_close(evomoe_balance_loss(uniform), torch.tensor(1.0))
    skewed = routing_from(torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8), [[0]] * 8)
    assert evomoe_balance_loss(skewed) > 2.5


def test_thor_consistency_is_a_symmetric_kl_over_masked_positions():
    a, b = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.rand(2, 5) > 0.3
    value = thor_consistency_loss(a, b, mask)
    torch.testing.assert_close(value, thor_consistency_loss(b, a, mask))
    assert thor_consistency_loss(a, a, mask) == 0 and value > 0
    pa, pb = torch.softmax(a, -1), torch.softmax(b, -1)
    kl = (pa * (pa.log() - pb.log())).sum(-1) + (pb * (pb.log() - pa.log())).sum(-1)
    torch.testing.assert_close(value, 0.5 * kl[mask].mean())
    b_changed_on_padding = b.clone()
    b_changed_on_padding[~mask] = 0
    torch.testing.assert_close(thor_consistency_loss(a, b_changed_on_padding, mask), value)


def test_thor_two_passes_disagree_and_the_regulariser_has_a_gradient():
    torch.manual_seed(0)
    layer = MoE(
        MoEConfig(
            hidden_size=8, ff_size=4, router=RouterSpec(num_experts=4, top_k=1), router_kind="stochastic"
        )
    ).train()
    x = torch.randn(12, 8)
    head = torch.nn.Linear(8, 5)
    logits = [head(layer(x)) for _ in range(8)]
    values = [thor_consistency_loss(logits[0], other) for other in logits[1:]]
    assert max(values) > 0  # independent draws give different outputs
    max(values).backward()
    assert layer.experts.w_in.grad.abs().sum() > 0


def loramoe_routing(weights):
    tokens, experts = weights.shape
    chosen = [list(range(experts)) for _ in range(tokens)]
    return routing_from(weights, chosen)


def test_loramoe_constraint_without_delta_is_the_cv_squared_of_sample_importance():
    weights = torch.softmax(torch.randn(6, 4), dim=-1)
    samples = torch.tensor([0, 0, 1, 1, 2, 2])
    types = torch.tensor([0, 0, 1, 1, 0, 0])
    importance = torch.zeros(3, 4).index_add(0, samples, weights)
    expected = importance.var(unbiased=False) / importance.mean() ** 2
    value = loramoe_localized_balance_loss(loramoe_routing(weights), types, 0.0, samples)
    torch.testing.assert_close(value, expected)


def test_loramoe_constraint_is_local_to_expert_groups():
    """Zero exactly when Q * I is constant; unchanged by swapping experts within a group, changed by
    swapping experts across groups (the coefficient depends on the group only)."""
    delta = 0.2
    types = torch.tensor([0, 1])
    target = torch.tensor(
        [[1 / (1 + delta)] * 2 + [1 / (1 - delta)] * 2, [1 / (1 - delta)] * 2 + [1 / (1 + delta)] * 2]
    )
    weights = target / target.sum(-1, keepdim=True)
    assert loramoe_localized_balance_loss(loramoe_routing(weights), types, delta) < 1e-12
    skewed = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4]])
    base = loramoe_localized_balance_loss(loramoe_routing(skewed), types, delta)
    within = loramoe_localized_balance_loss(loramoe_routing(skewed[:, [1, 0, 3, 2]]), types, delta)
    across = loramoe_localized_balance_loss(loramoe_routing(skewed[:, [2, 1, 0, 3]]), types, delta)
    torch.testing.assert_close(base, within)
    assert not torch.allclose(base, across)
    with pytest.raises(MoekitError, match="token types"):
        loramoe_localized_balance_loss(loramoe_routing(skewed), torch.tensor([0, 2]), delta)


def test_routing_contrastive_loss_is_lower_when_tokens_sit_on_their_prototype():
    torch.manual_seed(1)
    layer = MoE(
        MoEConfig(
            hidden_size=8,
            ff_size=4,
            router=RouterSpec(num_experts=4, top_k=1),
            router_kind="cosine",
            router_options={"temperature": 0.2},
        )
    )
    prototypes = torch.randn(4, 8)
    layer.router.set_prototypes(prototypes)
    near = layer.router(prototypes.repeat(5, 1) + 0.01 * torch.randn(20, 8))
    far = layer.router(torch.randn(20, 8))
    assert routing_contrastive_loss(near) < routing_contrastive_loss(far)
