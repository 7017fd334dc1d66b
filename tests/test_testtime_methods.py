"""Test-time routing methods: each moves the logits or the routing in its intended direction on a
constructed case, for moekit's LM and the HF families, and a no-op at its neutral
setting (SCMoE β = 0, ODP threshold 0)."""

import pytest
import torch

from helpers import tiny_lm, tiny_models
from moekit.addressing import moe_layers
from moekit.errors import ConfigError
from moekit.inference.generate import generate
from moekit.inference.methods import (
    expert_frequencies,
    odp_overrides,
    rewire,
    scmoe_generate,
    self_contrast_logits,
    steering_overrides,
)
from moekit.inference.methods.common import full_logits, next_token_loss
from moekit.routing.override import Overrides, RoutingCapture, RoutingOverride, override_routing

transformers = pytest.importorskip(
    "transformers", reason="transformers is installed by the `hf` extra that `make test` installs"
)
from moekit.interop.tiny import TINY_CONFIGS  # noqa: E402

FAMILIES = list(TINY_CONFIGS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory)


def prompt(model, rows=2, length=8, seed=0):
    vocab = model.embed.num_embeddings
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


def test_self_contrast_formula_and_plausibility_mask():
    strong = torch.tensor([[3.0, 2.9, 0.0, -5.0]])
    weak = torch.tensor([[3.0, 0.0, 0.0, -20.0]])
    out = self_contrast_logits(strong, weak, beta=1.0, alpha=0.1)
    # (1+β) z_s − β z_w on plausible tokens (p >= 0.1 p_max: tokens 0 and 1 only)
    assert out[0, 0] == 3.0 and out[0, 1] == pytest.approx(5.8)
    assert torch.isinf(out[0, 2:]).all()  # token 3 has the largest raw contrast but is implausible
    assert out.argmax() == 1 and strong.argmax() == 0
    assert torch.equal(self_contrast_logits(strong, weak, 0.0, 0.1).argmax(-1), strong.argmax(-1))


@pytest.mark.parametrize("name", ["moekit", *FAMILIES])
def test_scmoe_beta_zero_is_greedy_and_beta_changes_tokens(models, name):
    model = models(name)
    ids, mask = prompt(model)
    greedy = generate(model, ids, mask, max_new_tokens=6)
    same = scmoe_generate(model, ids, mask, max_new_tokens=6, beta=0.0)
    assert torch.equal(same.tokens, greedy)
    assert same.cost.forward_passes == 12 and same.cost.assignments > 0


@pytest.mark.parametrize("name", ["moekit", "qwen3_moe"])
def test_scmoe_ends_rows_at_eos_as_generate_does(models, name):
    """Text after an answer's end must not run into it: a row ends at EOS (pad after it), and
    decoding stops once every row has ended, saving the remaining passes."""
    model = models(name)
    ids, mask = prompt(model)
    free = generate(model, ids, mask, max_new_tokens=6)
    eos = int(free[0, ids.shape[1] + 1])  # row 0's second new token
    greedy = generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos)
    same = scmoe_generate(model, ids, mask, max_new_tokens=6, beta=0.0, eos_token_id=eos)
    assert torch.equal(same.tokens, greedy)
    single = scmoe_generate(model, ids[:1], mask[:1], max_new_tokens=6, beta=0.0, eos_token_id=eos)
    first_eos = (single.tokens[0, ids.shape[1] :] == eos).nonzero()[0, 0]
    assert single.tokens.shape[1] == ids.shape[1] + first_eos + 1  # stopped at row 0's EOS
    assert single.cost.forward_passes == 2 * (first_eos + 1)


def test_scmoe_contrast_moves_tokens_within_the_plausible_set():
    model = tiny_lm()
    with torch.no_grad():  # experts that matter: weak (top-1) and strong routing disagree more
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.mul_(4)
    ids, mask = prompt(model, rows=2, length=8, seed=3)
    greedy = generate(model, ids, mask, max_new_tokens=8)
    alpha = 1e-6
    contrast = scmoe_generate(model, ids, mask, max_new_tokens=8, beta=5.0, alpha=alpha)
    assert not torch.equal(contrast.tokens, greedy)
    # every chosen token was plausible under the strong model given the same prefix
    for row in range(ids.shape[0]):
        for step in range(8):
            prefix = contrast.tokens[row : row + 1, : ids.shape[1] + step]
            real = torch.cat([mask[row : row + 1].bool(), torch.ones(1, step, dtype=torch.bool)], 1)
            with torch.no_grad():
                logits = full_logits(model, prefix, real)[0, -1]
            chosen = contrast.tokens[row, ids.shape[1] + step]
            assert logits[chosen] >= logits.max() + torch.log(torch.tensor(alpha)) - 1e-4


@pytest.mark.parametrize("name", ["moekit", *FAMILIES])
def test_rewire_lowers_the_prompt_loss(models, name):
    model = models(name)
    ids, mask = prompt(model, length=12)
    result = rewire(model, ids, mask, steps=4, lr=0.05)
    assert result.loss_after < result.loss_before
    assert result.cost.forward_passes == 5 and result.cost.backward_passes == 4
    real = mask.bool()
    with torch.no_grad(), override_routing(model, result.overrides()):
        loss = next_token_loss(full_logits(model, ids, real), ids, real)
    assert float(loss) == pytest.approx(result.loss_after, rel=1e-5)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["moekit", *FAMILIES])
def test_steering_raises_the_steered_experts_frequency(models, name):
    model = models(name)
    reference, _ = prompt(model, rows=2, length=10, seed=5)
    target, mask = prompt(model, rows=2, length=10, seed=6)
    ref = expert_frequencies(model, reference)
    base = expert_frequencies(model, target, mask)
    layers = [len(ref) // 2]
    overrides = steering_overrides(ref, layers, strength=3.0, top_n=1, baseline=base)
    steered = expert_frequencies(model, target, mask, overrides=overrides)
    layer = layers[0]
    expert = int((ref[layer] - base[layer]).argmax())
    assert steered[layer][expert] > base[layer][expert]
    untouched = [i for i in ref if i < layer]
    for i in untouched:  # layers before the steered one see the same input, so the same routing
        assert torch.equal(steered[i], base[i])


@pytest.mark.parametrize("name", ["moekit", *FAMILIES])
def test_odp_threshold_zero_is_identical_and_positive_prunes(models, name):
    model = models(name)
    ids, mask = prompt(model)
    real = mask.bool()

    def run(overrides):
        capture = RoutingCapture()
        with_capture = Overrides(overrides.layers, overrides.default, capture)
        with torch.no_grad(), override_routing(model, with_capture):
            logits = full_logits(model, ids, real)
        count = sum(int(r.kept.token.numel()) for v in capture.routings.values() for r in v)
        return logits, count

    plain, plain_count = run(Overrides())
    zero, zero_count = run(odp_overrides(0.0))
    # threshold 0 re-selects with the router's own rule (bit-identical for most families; dbrx's
    # p-norm renormalisation is recomputed, so equal to rounding) and prunes nothing
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-5)
    assert zero_count == plain_count
    pruned, pruned_count = run(odp_overrides(0.9))
    assert pruned_count < plain_count
    assert not torch.equal(pruned, plain)
    _, one_count = run(odp_overrides(1.0))  # every real token keeps exactly its first expert
    assert one_count == int(real.sum()) * len(moe_layers(model)) <= pruned_count


def test_bad_parameters_name_the_field(models):
    model = models("moekit")
    ids, _ = prompt(model)
    with pytest.raises(ConfigError, match="threshold"):
        odp_overrides(1.5)
    with pytest.raises(ConfigError, match="alpha"):
        scmoe_generate(model, ids, alpha=2.0)
    with pytest.raises(ConfigError, match="layers"):
        steering_overrides(expert_frequencies(model, ids), [7])


@pytest.mark.parametrize("name", ["moekit", *FAMILIES])
def test_rank_override_picks_the_routers_ranked_expert(models, name):
    model = models(name)
    ids, mask = prompt(model)
    real = mask.bool()

    def chosen(override):
        capture = RoutingCapture()
        with torch.no_grad(), override_routing(model, Overrides(default=override, capture=capture)):
            full_logits(model, ids, real)
        kept = capture.routings[0][0].kept  # layer 0 sees the same input under every override
        return kept.token.tolist(), kept.expert.tolist(), kept.rank.tolist()

    plain = list(zip(*chosen(RoutingOverride()), strict=True))
    for rank in (0, 1):
        token, expert, _ = chosen(RoutingOverride(ranks=[rank]))
        expected = sorted((t, e) for t, e, r in plain if r == rank)
        assert sorted(zip(token, expert, strict=True)) == expected and expected
    greedy = generate(model, ids, mask, max_new_tokens=4)
    assert torch.equal(
        scmoe_generate(model, ids, mask, max_new_tokens=4, beta=0.0, weak_ranks=[1]).tokens, greedy
    )
