"""The upcycling recipes as pure tensor maps, against the dense FFN in float64."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from moekit.construct.ffn import DenseFFN, balanced_clusters, drop_reinit, upcycle_ffn
from moekit.construct.router_init import expert_prompt_groups, hidden_router, router_init
from moekit.errors import ConfigError


def dense_ffn(hidden: int, ff: int, seed: int = 0) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    return DenseFFN(
        torch.randn(ff, hidden, generator=g, dtype=torch.float64),
        torch.randn(ff, hidden, generator=g, dtype=torch.float64),
        torch.randn(hidden, ff, generator=g, dtype=torch.float64) / ff**0.5,
    )


def run_dense(ffn: DenseFFN, x):
    return (F.silu(x @ ffn.gate.T) * (x @ ffn.up.T)) @ ffn.down.T


def run_expert(experts, e: int, x):
    return (F.silu(x @ experts.gate[e].T) * (x @ experts.up[e].T)) @ experts.down[e].T


def mixture(experts, weights, x):
    """sum_e w[t, e] * expert_e(x[t]) + shared(x): the MoE of every routing, dense on all experts."""
    out = sum(weights[:, e : e + 1] * run_expert(experts, e, x) for e in range(experts.gate.shape[0]))
    if experts.shared is not None:
        out = out + run_dense(experts.shared, x)
    return out


@given(
    experts=st.integers(1, 6),
    top_k=st.integers(1, 6),
    shared=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_copy_with_renormalised_top_k_is_the_dense_ffn(experts, top_k, shared, seed):
    top_k = min(top_k, experts)
    ffn = dense_ffn(8, 12, seed)
    made = upcycle_ffn(ffn, experts, "copy", seed=seed, shared=shared)
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    scores = torch.rand(5, experts, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    top, idx = scores.topk(top_k, dim=-1)
    weights = torch.zeros_like(scores).scatter(1, idx, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(mixture(made, weights, x), run_dense(ffn, x), rtol=0, atol=1e-12)


@given(
    experts=st.sampled_from([1, 2, 3, 4, 6]),
    shared=st.booleans(),
    how=st.sampled_from(["contiguous", "random", "cluster"]),
    seed=st.integers(0, 1000),
)
def test_split_with_every_expert_at_weight_one_over_e_is_the_dense_ffn(experts, shared, how, seed):
    ff = 24 + (8 if shared else 0)  # 8 of 32 shared leaves 24 routed neurons
    ffn = dense_ffn(8, ff, seed)
    acts = torch.randn(40, ff, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    made = upcycle_ffn(ffn, experts, "split", seed=seed, shared=shared, split_partition=how, activations=acts)
    assert made.gate.shape == (experts, 24 // experts, 8)
    x = torch.randn(5, 8, dtype=torch.float64)
    weights = torch.full((5, experts), 1.0 / experts, dtype=torch.float64)
    torch.testing.assert_close(mixture(made, weights, x), run_dense(ffn, x), rtol=0, atol=1e-12)
    # the experts partition the neurons: each dense gate row sits in exactly one expert (or shared)
    rows = torch.cat([made.gate.reshape(-1, 8)] + ([made.shared.gate] if shared else []))
    assert torch.equal(rows[torch.argsort(rows[:, 0])], ffn.gate[torch.argsort(ffn.gate[:, 0])])


def test_split_with_routed_top_k_is_n_over_k_times_the_chosen_parts():
    ffn = dense_ffn(8, 16)
    made = upcycle_ffn(ffn, 4, "split")
    x = torch.randn(3, 8, dtype=torch.float64)
    chosen = (0, 2)
    weights = torch.zeros(3, 4, dtype=torch.float64)
    weights[:, list(chosen)] = 0.5  # renormalised top-2 of a uniform router
    parts = sum(
        (F.silu(x @ ffn.gate[4 * e : 4 * e + 4].T) * (x @ ffn.up[4 * e : 4 * e + 4].T))
        @ ffn.down[:, 4 * e : 4 * e + 4].T
        for e in chosen
    )
    torch.testing.assert_close(mixture(made, weights, x), parts * 4 / 2, rtol=0, atol=1e-12)


def test_drop_reinitialises_the_ratio_of_neurons_per_expert_and_zero_is_copy():
    ffn = dense_ffn(8, 40)
    made = upcycle_ffn(ffn, 3, "drop", drop_ratio=0.25, seed=1)
    for e in range(3):
        changed = (made.gate[e] != ffn.gate).any(dim=1)
        assert int(changed.sum()) == 10
        assert torch.equal((made.up[e] != ffn.up).any(dim=1), changed)
        assert torch.equal((made.down[e] != ffn.down).any(dim=0), changed)
    assert not torch.equal(made.gate[0], made.gate[1])  # experts differ from each other
    same = upcycle_ffn(ffn, 3, "drop", drop_ratio=0.0)
    copied = upcycle_ffn(ffn, 3, "copy")
    assert torch.equal(same.gate, copied.gate) and torch.equal(same.down, copied.down)


def test_drop_reinit_draws_from_the_dense_matrix_statistics():
    w = torch.randn(400, 300, dtype=torch.float64) * 3 + 2
    rows = torch.arange(0, 400, 2)
    out = drop_reinit(w, rows, torch.Generator().manual_seed(0), dim=0)
    fresh = out[rows]
    assert abs(fresh.mean().item() - w.mean().item()) < 0.05
    assert abs(fresh.std().item() - w.std().item()) < 0.05
    assert torch.equal(out[1::2], w[1::2])


def test_noise_breaks_the_symmetry_of_copies():
    ffn = dense_ffn(8, 12)
    made = upcycle_ffn(ffn, 2, "copy", noise=1e-3)
    assert not torch.equal(made.gate[0], made.gate[1])
    relative = (made.gate - ffn.gate) / ffn.gate  # multiplicative: about 1e-3 per weight
    assert 2e-4 < relative.std() < 2e-3


def test_balanced_clusters_are_equal_and_group_similar_neurons():
    centers = torch.eye(4, dtype=torch.float64) * 10
    features = centers.repeat_interleave(5, dim=0) + 0.1 * torch.randn(20, 4, dtype=torch.float64)
    shuffled = torch.randperm(20)
    order = balanced_clusters(features[shuffled], 4, seed=0)
    assert sorted(order.tolist()) == list(range(20))
    truth = torch.arange(20).div(5, rounding_mode="floor")[shuffled]
    for block in order.view(4, 5):
        assert len(set(truth[block].tolist())) == 1


def test_router_inits():
    assert torch.equal(router_init("zero", 3, 5), torch.zeros(3, 5))
    r = router_init("random", 3, 5, seed=1)
    assert torch.equal(r, router_init("random", 3, 5, seed=1)) and not torch.equal(
        r, router_init("random", 3, 5, seed=2)
    )
    means = torch.randn(4, 16, dtype=torch.float64) * 5
    rows = hidden_router(means)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(4, dtype=torch.float64))
    logits = means @ rows.T  # each expert's own prompts score highest on it
    assert torch.equal(logits.argmax(dim=1), torch.arange(4))
    with pytest.raises(ConfigError, match="hidden"):
        router_init("hidden", 4, 16)


def test_expert_prompt_groups_cycle_domains_with_disjoint_slices():
    groups = expert_prompt_groups({"a": ["a0", "a1", "a2", "a3"], "b": ["b0", "b1"]}, 3)
    assert groups == [["a0", "a2"], ["b0", "b1"], ["a1", "a3"]]


def test_bad_recipes_name_the_field():
    with pytest.raises(ConfigError, match="do not divide into 5 experts"):
        upcycle_ffn(dense_ffn(4, 12), 5, "split")
    with pytest.raises(ConfigError, match="method"):
        upcycle_ffn(dense_ffn(4, 12), 2, "merge")
