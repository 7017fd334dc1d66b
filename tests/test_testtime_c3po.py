"""C3PO (#29): the formulas, and that re-mixing moves the last prompt token's routing where it
should (towards the neighbours' pathways; NGD down the neighbours' loss, on core experts only),
while the identity (the item's own pathway, zero NGD steps) leaves routing and logits as they are,
for moekit's LM and the HF families."""

import pytest
import torch

from helpers import tiny_models
from moekit.errors import ConfigError
from moekit.inference.generate import generate
from moekit.inference.methods.c3po import (
    Reference,
    blend,
    c3po,
    c3po_generate,
    choose_neighbours,
    core_scaled,
    critical_layers,
    embed_and_route,
    gaussian_kernel,
    kernel_regression,
    make_reference,
    neighbourhood_loss,
    pathway_overrides,
    pathway_routing,
)
from moekit.inference.methods.common import full_logits
from moekit.routing.override import Overrides, RoutingCapture, override_routing
from moekit.routing.spec import preset

transformers = pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
from moekit.interop.tiny import TINY_CONFIGS  # noqa: E402

FAMILIES = list(TINY_CONFIGS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory)


def tokens(model, length, seed):
    vocab = min(model.embed.num_embeddings, 60)
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def references(model, count=4, seed=10):
    return [
        make_reference(model, tokens(model, 6, seed + i), tokens(model, 3, 100 + i)) for i in range(count)
    ]


def last_token_routing(model, prompt, overrides=None):
    """{layer: (chosen experts set, {expert: weight})} of the prompt's last token."""
    capture = RoutingCapture()
    base = overrides or Overrides()
    ids = torch.tensor([prompt])
    with override_routing(model, Overrides(base.layers, base.default, capture)):
        full_logits(model, ids, torch.ones_like(ids, dtype=torch.bool))
    out = {}
    last = len(prompt) - 1
    for index, records in capture.routings.items():
        kept = records[-1].kept
        rows = kept.token == last
        out[index] = {int(e): float(w) for e, w in zip(kept.expert[rows], kept.weight[rows], strict=True)}
    return out


def test_kernel_regression_blend_and_gaussian_kernel_formulas():
    pathways = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(
        kernel_regression(torch.tensor([3.0, 1.0]), pathways), torch.tensor([0.75, 0.25, 0.0])
    )
    assert torch.allclose(
        blend(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.25), torch.tensor([0.25, 0.75])
    )
    kernel = gaussian_kernel(torch.tensor([0.0, 1.0, 2.0]), bandwidth=1.0)
    assert torch.allclose(kernel, torch.exp(torch.tensor([0.0, -0.5, -2.0])))
    own = torch.tensor([0.5, 0.3, 0.2])
    assert torch.allclose(core_scaled(own, torch.zeros(3), torch.tensor([True, False, True]), True), own)
    moved = core_scaled(own, torch.tensor([1.0, 5.0, 0.0]), torch.tensor([True, False, True]), True)
    assert moved.sum() == pytest.approx(1.0) and moved[0] > own[0]
    assert moved[1] / own[1] == pytest.approx(moved[2] / own[2])  # θ of a non-core expert is ignored


def test_pathway_routing_is_top_k_renormalised():
    spec = preset("qwen3_moe", 4, 2)
    chosen, weights = pathway_routing(torch.tensor([0.1, 0.5, 0.3, 0.1]), spec)
    assert chosen.tolist() == [False, True, True, False]
    assert torch.allclose(weights, torch.tensor([0.0, 0.625, 0.375, 0.0]))


def test_neighbours_are_the_nearest_and_random_mode_ignores_distance():
    refs = [Reference([1], [2], torch.tensor([float(i), 0.0]), {}) for i in range(6)]
    chosen, kernel = choose_neighbours(torch.tensor([4.2, 0.0]), refs, 3)
    assert chosen == [4, 5, 3]
    assert kernel[0] > kernel[1] > kernel[2] > 0  # closer neighbours weigh more
    random_sets = {
        tuple(sorted(choose_neighbours(torch.tensor([4.2, 0.0]), refs, 3, mode="random", seed=s)[0]))
        for s in range(8)
    }
    assert len(random_sets) > 1


@pytest.mark.parametrize("name", ["moekit", *FAMILIES])
def test_own_pathway_and_zero_steps_are_no_ops(models, name):
    model = models(name)
    prompt = tokens(model, 7, 1)
    _, own = embed_and_route(model, prompt)
    ids = torch.tensor([prompt])
    real = torch.ones_like(ids, dtype=torch.bool)
    last = torch.zeros_like(real)
    last[:, -1] = True
    with torch.no_grad():
        plain = full_logits(model, ids, real)
        with override_routing(model, pathway_overrides(model, own, last)):
            same = full_logits(model, ids, real)
    assert torch.allclose(plain, same, atol=1e-5)
    result = c3po(model, prompt, references(model), steps=0)
    assert result.pathway.keys() == result.own.keys() == set(critical_layers(model))
    assert all(torch.equal(result.pathway[i], result.own[i]) for i in result.own)
    out, cost = c3po_generate(model, prompt, result.pathway, max_new_tokens=4)
    assert torch.equal(out, generate(model, ids, max_new_tokens=4))
    assert cost.forward_passes == 4


@pytest.mark.parametrize("name", ["moekit", *FAMILIES])
def test_kernel_regression_moves_the_last_token_towards_the_neighbours(models, name):
    model = models(name)
    prompt = tokens(model, 7, 1)
    refs = references(model)
    own_routing = last_token_routing(model, prompt)
    layer = critical_layers(model)[-1]
    # neighbours whose pathway puts its mass on an expert the item does not choose
    experts = len(refs[0].pathway[layer])
    target = next(e for e in range(experts) if e not in own_routing[layer])
    for ref in refs:
        ref.pathway[layer] = torch.full((experts,), 0.01).index_fill(0, torch.tensor([target]), 1.0)
    result = c3po(model, prompt, refs, variant="kernel", alphas=(0.0,), neighbours=2)
    assert result.alpha == 0.0 and len(result.neighbours) == 2
    last = torch.zeros(1, len(prompt), dtype=torch.bool)
    last[:, -1] = True
    moved = last_token_routing(model, prompt, Overrides(pathway_overrides(model, result.pathway, last)))
    assert target in moved[layer] and target not in own_routing[layer]
    assert moved[layer][target] == max(moved[layer].values())  # now the heaviest
    # the α search picks the blend with the lowest neighbour loss, never worse than the own pathway
    searched = c3po(model, prompt, refs, variant="kernel")
    assert searched.alpha in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert searched.loss_after <= searched.loss_before


@pytest.mark.parametrize("name", ["moekit", *FAMILIES[:3]])
def test_ngd_lowers_the_neighbour_loss_on_core_experts_only(models, name):
    model = models(name)
    prompt = tokens(model, 7, 1)
    refs = references(model)
    result = c3po(model, prompt, refs, steps=8, lr=0.5, core_experts=3, neighbours=3)
    assert result.loss_after < result.loss_before
    recomputed = neighbourhood_loss(
        model, [refs[i] for i in result.neighbours], result.kernel, result.pathway
    )
    assert float(recomputed.detach()) == pytest.approx(result.loss_after, rel=1e-4)
    moved = [i for i in result.own if not torch.allclose(result.pathway[i], result.own[i])]
    assert moved
    for index in moved:
        ratio = result.pathway[index] / result.own[index]
        core = result.own[index].topk(3).indices
        rest = torch.ones_like(ratio, dtype=torch.bool).index_fill(0, core, False)
        assert torch.allclose(ratio[rest], ratio[rest][0].expand(int(rest.sum())), rtol=1e-4)  # one scale
    assert result.cost.backward_passes == 8


def test_apply_to_new_routes_generated_tokens_by_the_pathway(models):
    model = models("moekit")
    prompt = tokens(model, 7, 1)
    layer = critical_layers(model)[-1]
    experts = model.moe_layers[layer].config.router.num_experts
    pathway = {layer: torch.full((experts,), 0.01).index_fill(0, torch.tensor([5, 6]), 1.0)}
    for apply_to_new in (False, True):
        capture = RoutingCapture()
        c3po_generate(model, prompt, pathway, max_new_tokens=3, apply_to_new=apply_to_new, capture=capture)
        records = capture.routings[layer]
        prefill, steps = records[0], records[1:]
        assert set(prefill.kept.expert[prefill.kept.token == len(prompt) - 1].tolist()) == {5, 6}
        forced = [set(r.kept.expert.tolist()) == {5, 6} for r in steps]
        assert all(forced) if apply_to_new else not all(forced)


def test_bad_parameters_name_the_field(models):
    model = models("moekit")
    prompt, refs = tokens(model, 5, 1), references(model, 2)
    for kwargs, field in [
        ({"variant": "mean-shift"}, "variant"),
        ({"kernel": "box"}, "kernel"),
        ({"neighbours": 0}, "neighbours"),
        ({"neighbour_mode": "far"}, "neighbour_mode"),
        ({"layers": 9}, "layers"),
        ({"alphas": (1.5,)}, "alphas"),
        ({"core_experts": 99}, "core_experts"),
    ]:
        with pytest.raises(ConfigError) as error:
            c3po(model, prompt, refs, steps=1, **kwargs)
        assert error.value.field == field
    with pytest.raises(ConfigError, match="references"):
        c3po(model, prompt, [])
