"""DES (#27): each trajectory really runs at its own k for every step, the neutral setting (the
model's own k, N = 1, greedy) is plain generation, best-of-N is at least every trajectory, and the
cost counts every trajectory; for moekit's LM and tiny HF families."""

import pytest
import torch

from helpers import tiny_lm, tiny_models
from moekit.addressing import moe_layers
from moekit.errors import ConfigError
from moekit.inference.generate import generate
from moekit.inference.methods import des_search, k_schedule
from moekit.inference.methods.des import default_k_values, model_top_k

transformers = pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)

NAMES = ["moekit", "mixtral", "qwen3_moe"]


def loud_experts_lm(seed=0):
    model = tiny_lm(seed)
    # at random init the experts' output is small next to the residual stream, so k barely moves
    # the next token; larger expert weights make routing decide it, as in a trained model
    with torch.no_grad():
        for _, _, layer in moe_layers(model):
            for name, parameter in layer.named_parameters():
                if "router" not in name:
                    parameter.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory, loud_experts_lm)


def prompt(model, length=6, seed=0):
    vocab = model.embed.num_embeddings
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def test_k_schedule_splits_samples_evenly_and_refuses_bad_sets():
    assert k_schedule([1, 2, 3, 4], 8) == [1, 2, 3, 4, 1, 2, 3, 4]
    assert k_schedule([2], 3) == [2, 2, 2]
    for bad in ([], [0], [1.5], [True]):
        with pytest.raises(ConfigError, match="k_values"):
            k_schedule(bad, 2)
    with pytest.raises(ConfigError, match="samples"):
        k_schedule([1], 0)


@pytest.mark.parametrize("name", NAMES)
def test_each_trajectory_routes_with_its_own_k_and_cost_counts_all(models, name):
    model = models(name)
    ids = prompt(model)
    new, k_values = 4, [1, 2, 3]
    result = des_search(model, ids, lambda t: 0.0, k_values=k_values, samples=6, max_new_tokens=new)
    layers = len(moe_layers(model))
    fed = ids.shape[1] + new - 1  # prefill, then every new token but the last is fed back
    assert [t.k for t in result.trajectories] == k_values * 2
    for trajectory in result.trajectories:
        assert trajectory.assignments == trajectory.k * fed * layers
        assert trajectory.tokens.shape == (1, ids.shape[1] + new)
    assert result.cost.forward_passes == 6 * new
    assert result.cost.assignments == sum(t.assignments for t in result.trajectories)
    assert result.cost.backward_passes == 0


@pytest.mark.parametrize("name", NAMES)
def test_own_k_one_greedy_sample_is_plain_generation(models, name):
    model = models(name)
    ids = prompt(model, seed=1)
    k0 = model_top_k(model)
    assert k0 in default_k_values(model)
    result = des_search(
        model, ids, lambda t: 0.0, k_values=[k0], samples=1, max_new_tokens=5, do_sample=False
    )
    assert torch.equal(result.tokens, generate(model, ids, max_new_tokens=5))
    assert result.cost.forward_passes == 5


@pytest.mark.parametrize("name", NAMES)
def test_best_of_n_is_at_least_every_trajectory_and_k_adds_diversity(models, name):
    model = models(name)
    k0 = model_top_k(model)
    prompts = [prompt(model, seed=s) for s in range(4)]
    # verifier: correct iff the new tokens are the ones greedy decoding at k = 1 picks
    targets = [generate(model, p, max_new_tokens=3, overrides=_k(1))[0, -3:] for p in prompts]
    per_trajectory, best, fixed = [], [], []
    for p, target in zip(prompts, targets, strict=True):

        def verifier(new, target=target):
            return float(torch.equal(new, target))

        search = des_search(
            model, p, verifier, k_values=[1, k0], samples=2, max_new_tokens=3, do_sample=False
        )
        assert search.tokens is search.trajectories[search.best].tokens
        assert search.trajectories[search.best].score == max(t.score for t in search.trajectories)
        per_trajectory.append([t.score for t in search.trajectories])
        best.append(search.trajectories[search.best].score)
        same_n = des_search(model, p, verifier, k_values=[k0], samples=2, max_new_tokens=3, do_sample=False)
        fixed.append(same_n.trajectories[same_n.best].score)
    accuracy = sum(best) / len(best)
    for i in range(2):
        assert accuracy >= sum(scores[i] for scores in per_trajectory) / len(prompts)
    assert accuracy == 1.0  # the k = 1 trajectory always finds the target
    # on at least one prompt k changes the answer: the k-set beats best-of-N at the model's k
    assert sum(fixed) < sum(best)


def _k(k):
    from moekit.routing.override import RoutingOverride

    return RoutingOverride(top_k=k)


def test_sampled_trajectories_differ_and_bad_inputs_name_the_field(models):
    model = models("moekit")
    ids = prompt(model)
    result = des_search(model, ids, lambda t: float(t.sum()), k_values=[2], samples=4, max_new_tokens=6)
    assert len({tuple(t.tokens[0].tolist()) for t in result.trajectories}) > 1  # seeds differ
    assert result.trajectories[result.best].score == max(t.score for t in result.trajectories)
    with pytest.raises(ConfigError, match="k_values"):
        des_search(model, ids, lambda t: 0.0, k_values=[9], samples=1)
    with pytest.raises(ConfigError, match="temperature"):
        des_search(model, ids, lambda t: 0.0, temperature=0.0)
    with pytest.raises(ConfigError, match="input_ids"):
        des_search(model, ids.repeat(2, 1), lambda t: 0.0)
