"""Gumbel-softmax latents report true bounds on the discrete model's log p(x), checked by enumeration.

The model (tests/unit/discrete_model.py) has 9 latent configurations, so its log p(x), ELBO and
expected IWAE-k are exact sums. Tolerances are Z = 4.4 standard errors of the Monte Carlo mean
(the per-check false-alarm rate of a correct estimator is near 1e-5; the seeds are fixed).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from streamvi.estimators import (
    DoublyReparameterized,
    ImportanceWeighted,
    ScoreFunction,
    SGVBAnalyticKL,
    SGVBMonteCarlo,
    StickingTheLanding,
    log_likelihood_estimate,
)
from streamvi.model.latents import GumbelSoftmax
from tests.unit.discrete_model import CLASSES, VARIABLES, DiscreteModel

Z = 4.4
STEP = tf.constant(0, tf.int64)
IWAE_K = 3
ESTIMATORS = {
    "sgvb_a": lambda: SGVBMonteCarlo(),
    "sgvb_b": lambda: SGVBAnalyticKL(),
    "stl": lambda: StickingTheLanding(),
    "score_function": lambda: ScoreFunction(baseline="none"),
    "iwae": lambda: ImportanceWeighted(IWAE_K),
    "dreg": lambda: DoublyReparameterized(IWAE_K),
}


def no_context(x: tf.Tensor) -> tf.Tensor:
    return tf.zeros([int(x.shape[0]), 0])


def bound_draws(estimator, model, x: tf.Tensor, n: int, seed: int) -> np.ndarray:
    """[n, N]: n independent reported bounds of every record of ``x`` (one tiled batch)."""
    tiled = tf.tile(x, [n, 1])
    terms = estimator.terms(model, tiled, no_context(tiled), tf.constant([seed, 0], tf.int32), STEP)
    return terms.bound.numpy().reshape(n, int(x.shape[0]))


def mean_and_se(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return values.mean(0), values.std(0, ddof=1) / np.sqrt(len(values))


@pytest.mark.parametrize("straight_through", [False, True], ids=["relaxed", "straight_through"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_reports_a_true_bound_on_the_discrete_model(name, straight_through):
    dm = DiscreteModel.make(seed=3, straight_through=straight_through)
    x = tf.constant(dm.sample(5, seed=4))
    log_px = dm.log_evidence(x).numpy()
    exact = (dm.iwae(x, IWAE_K) if name in ("iwae", "dreg") else dm.elbo(x)).numpy()
    assert np.all(exact < log_px - 0.05)  # q is not the posterior: the bound has a gap to close
    mean, se = mean_and_se(bound_draws(ESTIMATORS[name](), dm.model, x, 4000, seed=5))
    assert np.all(mean <= log_px + Z * se), (mean, log_px)
    # the figure is the discrete model's bound itself, not a relaxed or mixed one
    assert np.all(np.abs(mean - exact) <= Z * se), (mean, exact)


def test_the_relaxed_objective_differs_from_the_reported_bound():
    """The relaxed ELBO (what the relaxed gradient follows) is not the discrete ELBO: reporting it
    would misstate the bound; the reported figure is the discrete one."""
    dm = DiscreteModel.make(seed=3)
    x = tf.constant(dm.sample(5, seed=4))
    tiled = tf.tile(x, [4000, 1])
    terms = SGVBMonteCarlo().terms(dm.model, tiled, no_context(tiled), tf.constant([6, 0], tf.int32), STEP)
    relaxed, se_relaxed = mean_and_se(terms.surrogate.numpy().reshape(4000, 5))
    reported, se_reported = mean_and_se(terms.bound.numpy().reshape(4000, 5))
    gap = np.abs(relaxed - reported)
    assert np.max(gap / np.sqrt(se_relaxed**2 + se_reported**2)) > 10


def test_importance_weighted_log_likelihood_rises_to_log_evidence_from_below():
    """The held-out / ``encode`` estimate: exact one-hot draws and categorical densities, so for
    small k its mean is the enumerated E[IWAE-k] of the discrete model, and it rises to log p(x)."""
    dm = DiscreteModel.make(seed=7)
    x = tf.constant(dm.sample(4, seed=8))
    log_px = dm.log_evidence(x).numpy()
    means = {}
    for k, copies in ((1, 1000), (2, 1000), (3, 1000), (16, 1000), (256, 400), (1024, 400)):
        tiled = tf.tile(x, [copies, 1])
        seed = tf.constant([k, 1], tf.int32)
        estimates = log_likelihood_estimate(dm.model, tiled, no_context(tiled), k, seed, STEP)
        mean, se = mean_and_se(estimates.numpy().reshape(copies, 4))
        assert np.all(mean <= log_px + Z * se), (k, mean, log_px)
        if k <= IWAE_K:
            exact = dm.iwae(x, k).numpy()
            assert np.all(np.abs(mean - exact) <= Z * se), (k, mean, exact)
        means[k] = (mean, se)
    ks = sorted(means)
    for low, high in itertools.pairwise(ks):
        assert np.all(means[high][0] > means[low][0] - Z * np.hypot(means[low][1], means[high][1]))
    gap_1, gap_1024 = log_px - means[1][0], log_px - means[1024][0]
    assert np.all(gap_1024 < 0.5 * gap_1), (gap_1, gap_1024)


def flat_gradient(tape: tf.GradientTape, target: tf.Tensor, variables) -> np.ndarray:
    return np.concatenate([g.numpy().ravel() for g in tape.gradient(target, variables)])


def gradient_draws(estimator, model, x: tf.Tensor, n: int, seed: int) -> np.ndarray:
    """[n, parameters]: n independent single-draw gradients of the batch-mean surrogate."""
    variables = model.trainable_variables
    tiled = tf.tile(x, [n, 1])
    with tf.GradientTape() as tape:
        terms = estimator.terms(model, tiled, no_context(tiled), tf.constant([seed, 0], tf.int32), STEP)
        per_draw = tf.reduce_mean(tf.reshape(terms.surrogate, [n, -1]), axis=1)
    jacobians = tape.jacobian(per_draw, variables)
    return np.concatenate([j.numpy().reshape(n, -1) for j in jacobians], axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["none", "learned"])
def test_score_function_gradients_are_unbiased_for_the_enumerated_elbo_gradient(baseline):
    dm = DiscreteModel.make(seed=9, scale=0.4)
    x = tf.constant(dm.sample(4, seed=10))
    # Every class must be drawn often in 4000 draws, or a rare class's share of the gradient is
    # missed while the sample variance looks small and the standard error is not trustworthy.
    _, log_q = dm.log_joint_and_q(x)
    assert np.exp(log_q.numpy()).min() > 0.005
    estimator = ScoreFunction(baseline=baseline, input_width=x.shape[1], hidden=8)
    if estimator.network is not None:
        # a baseline that depends on x (random weights, not yet fitted) and a non-zero running mean
        # folded in by the estimator's own update rule: neither may bias the gradient
        rng = np.random.default_rng(0)
        estimator.network.set_weights([rng.normal(size=w.shape) for w in estimator.network.get_weights()])
        tiled = tf.tile(x, [50, 1])
        terms = estimator.terms(dm.model, tiled, no_context(tiled), tf.constant([1, 2], tf.int32), STEP)
        estimator.update_state(terms, tf.ones([tiled.shape[0]]))
        assert abs(float(estimator.running_mean())) > 1.0
    with tf.GradientTape() as tape:
        objective = tf.reduce_mean(dm.elbo(x))
    exact = flat_gradient(tape, objective, dm.model.trainable_variables)
    grads = gradient_draws(estimator, dm.model, x, 4000, seed=11)[:, : exact.size]
    mean, se = mean_and_se(grads)
    assert np.all(np.abs(mean - exact) <= Z * se + 1e-5 * (1 + np.abs(exact)))
    assert np.abs(exact).max() > 0.1  # the check is not vacuous


def test_straight_through_forward_values_are_exact_categorical_draws():
    logits = tf.constant(np.log([[0.5, 0.3, 0.2, 0.45, 0.45, 0.1]]), tf.float32)
    family = GumbelSoftmax(VARIABLES, CLASSES, straight_through=True)
    n = 20_000
    sample = family.sample(logits, n, tf.constant([3, 4]), STEP)
    z = sample.decoder_input.numpy().reshape(n, VARIABLES, CLASSES)
    assert set(np.unique(z)) == {0.0, 1.0} and np.all(z.sum(-1) == 1.0)  # exactly one-hot forward
    probs = np.array([[0.5, 0.3, 0.2], [0.45, 0.45, 0.1]])
    for variable in range(VARIABLES):
        counts = z[:, variable, :].sum(0)
        _, p_value = stats.chisquare(counts, probs[variable] * n)
        assert p_value > 1e-3  # a fixed seed; 1e-3 is the chance a correct sampler would fail
    # the densities the reported bound uses are those of the categorical draw that was decoded
    expected = np.log(probs[np.arange(VARIABLES), z.argmax(-1)]).sum(-1)
    assert sample.exact_log_q is not None
    np.testing.assert_allclose(sample.exact_log_q.numpy()[:, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(sample.exact_log_prior.numpy(), -VARIABLES * np.log(CLASSES), rtol=1e-6)
