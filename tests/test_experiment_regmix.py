"""RegMix on moekit's corpus (`experiments.regmix`, #32): the mixture sampler follows the paper's
rules, held-out predictions never see their own run, and the final mixture is the mean of the
predicted-best simulated mixtures."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.experiments import regmix


@settings(deadline=None, max_examples=20)
@given(st.lists(st.floats(0.05, 1.0), min_size=2, max_size=6), st.integers(1, 40), st.integers(0, 1000))
def test_synthesized_mixtures_follow_the_papers_rules(prior, count, seed):
    prior = np.array(prior) / np.sum(prior)
    mixtures = regmix.synthesize_mixtures(prior, count, seed)
    assert mixtures.shape == (count, len(prior))
    assert np.allclose(mixtures.sum(axis=1), 1.0)
    assert (mixtures >= 0).all() and (mixtures <= prior * regmix.MAX_EPOCHS + 1e-9).all()
    nonzero = mixtures[mixtures > 0]
    assert (nonzero >= regmix.GRID * 0.5).all()
    assert len({tuple(np.round(m, 6)) for m in mixtures}) == count  # distinct
    assert np.array_equal(mixtures, regmix.synthesize_mixtures(prior, count, seed))  # seeded


def test_out_of_fold_predictions_never_see_their_own_run():
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.ones(5), size=40)
    losses = weights @ np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    exact = regmix.out_of_fold("linear", weights, losses)
    assert np.allclose(exact, losses, atol=1e-9)  # a linear truth is recovered from the other folds
    poisoned = losses.copy()
    poisoned[0] += 100.0  # a run's own loss cannot reach its own prediction
    moved = regmix.out_of_fold("linear", weights, poisoned)
    folds = np.arange(40) % regmix.FOLDS
    assert moved[0] == pytest.approx(exact[0], abs=1e-9)  # run 0's prediction is unchanged...
    assert np.allclose(moved[folds == 0], exact[folds == 0], atol=1e-9)  # ...as is its whole fold's
    assert not np.allclose(moved[folds != 0], exact[folds != 0])  # the other folds trained on it


def test_the_final_mixture_is_the_mean_of_the_predicted_best():
    prior = np.full(4, 0.25)
    # a predictor that loves domain 2: the top mixtures are the ones with the most of it
    chosen = regmix.best_mixture(lambda w: -w[:, 2], prior, candidates=200, top=10, seed=3)
    simulated = regmix.synthesize_mixtures(prior, 200, 3)
    expected = simulated[np.argsort(-simulated[:, 2], kind="stable")[:10]].mean(axis=0)
    assert np.allclose(chosen, expected) and chosen.sum() == pytest.approx(1.0)
    assert chosen[2] > 0.5


def test_linear_coefficients_are_least_squares_with_an_intercept():
    rng = np.random.default_rng(1)
    weights = rng.dirichlet(np.ones(3), size=30)
    # the weights sum to 1, so the intercept and the coefficients are tied: check the predictions
    losses = 2.0 + weights @ np.array([0.5, -1.0, 0.25])
    coefficients = regmix.linear_coefficients(weights, losses, ("a", "b", "c"))
    design = np.column_stack([weights, np.ones(30)])
    intercept = np.linalg.lstsq(design, losses, rcond=None)[0][-1]
    predicted = weights @ np.array(list(coefficients.values())) + intercept
    assert np.allclose(predicted, losses, atol=1e-9)
