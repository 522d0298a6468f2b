"""Every estimator against the closed-form linear-Gaussian model; tolerances are Monte Carlo errors.

With n independent draws of a quantity, its mean is checked against the exact value to within
Z standard errors of the mean; Z = 4.4 bounds the per-check false-alarm rate near 1e-5 (the seeds
are fixed, so this states how unlucky a seed would have to be, not a flakiness rate).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_probability import distributions as tfd

from streamvi.estimators import (
    DoublyReparameterized,
    ImportanceWeighted,
    ScoreFunction,
    SGVBAnalyticKL,
    SGVBMonteCarlo,
    StickingTheLanding,
)
from tests.unit.linear_gaussian import LinearGaussian

Z = 4.4
STEP = tf.constant(0, tf.int64)


def no_context(x: tf.Tensor) -> tf.Tensor:
    return tf.zeros([int(x.shape[0]), 0])


def draws(estimator, model, x, n, seed=0):
    """``n`` independent evaluations of every record of ``x``, as one batch of ``n`` tiled copies.

    Every row draws its own latent sample, so row r of copy i is an independent draw for record r.
    Returns a function of a BoundTerms field name giving an array of shape [n, len(x)].
    """
    tiled = tf.tile(x, [n, 1])
    terms = estimator.terms(model, tiled, no_context(tiled), tf.constant([seed, 0], tf.int32), STEP)
    batch = int(x.shape[0])
    return lambda name: getattr(terms, name).numpy().reshape(n, batch)


def gradient_draws(estimator, model, x, n, seed=11) -> np.ndarray:
    """[n, parameters]: n independent single-draw gradients of the batch-mean surrogate."""
    variables = model.trainable_variables
    tiled = tf.tile(x, [n, 1])
    with tf.GradientTape() as tape:
        surrogate = estimator.terms(
            model, tiled, no_context(tiled), tf.constant([seed, 0], tf.int32), STEP
        ).surrogate
        per_draw = tf.reduce_mean(tf.reshape(surrogate, [n, -1]), axis=1)
    jacobians = tape.jacobian(per_draw, variables)
    return np.concatenate([j.numpy().reshape(n, -1) for j in jacobians], axis=1)


def encoder_columns(model) -> np.ndarray:
    """Boolean mask over the flattened gradient: True for the encoder's parameters."""
    encoder = {v.ref() for v in model.encoder.trainable_variables}
    return np.concatenate(
        [np.full(int(np.prod(v.shape)), v.ref() in encoder) for v in model.trainable_variables]
    )


def exact_gradient(lg: LinearGaussian, model, x) -> np.ndarray:
    with tf.GradientTape() as tape:
        objective = tf.reduce_mean(lg.closed_form_elbo(model, x))
    return np.concatenate([g.numpy().ravel() for g in tape.gradient(objective, model.trainable_variables)])


def assert_unbiased(grads: np.ndarray, exact: np.ndarray) -> None:
    mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(len(grads))
    # Coordinates with no sampling noise at all (e.g. an analytic KL's share) must match to rounding.
    assert np.all(np.abs(mean - exact) <= Z * se + 1e-4 * (1 + np.abs(exact)))
    assert np.abs(exact).max() > 0.1  # the check is not vacuous


ELBO_ESTIMATORS = [SGVBMonteCarlo, SGVBAnalyticKL, StickingTheLanding]


@pytest.mark.parametrize("cls", [*ELBO_ESTIMATORS, ImportanceWeighted, DoublyReparameterized, ScoreFunction])
def test_bound_at_exact_posterior_is_log_evidence(cls):
    lg = LinearGaussian.make()
    x = tf.constant(lg.sample(6))
    model = lg.vae(exact_encoder=True)
    log_px = lg.log_evidence(x.numpy())
    np.testing.assert_allclose(lg.closed_form_elbo(model, x).numpy(), log_px, rtol=1e-4, atol=1e-3)
    bounds = draws(cls(samples=3), model, x, 2000)("bound")
    mean, se = bounds.mean(0), bounds.std(0, ddof=1) / np.sqrt(len(bounds))
    assert np.all(np.abs(mean - log_px) <= Z * se + 1e-3)
    if cls is not SGVBAnalyticKL:  # log p(x,z) - log q(z|x) = log p(x) for every z: no variance left
        assert bounds.std(0).max() < 1e-3


def test_kl_is_analytic_and_bound_mean_matches_closed_form_elbo():
    lg = LinearGaussian.make(seed=3)
    x = tf.constant(lg.sample(8, seed=4))
    model = lg.vae(exact_encoder=False)
    exact = lg.closed_form_elbo(model, x).numpy()
    assert np.all(exact < lg.log_evidence(x.numpy()))  # a worse q has a strictly lower bound
    terms = draws(SGVBAnalyticKL(samples=1), model, x, 3000)
    kls = terms("kl")
    assert np.ptp(kls, axis=0).max() == 0.0  # analytic: no sampling variance
    m, stddev = model.latent.summary(model.encode(x, no_context(x)), STEP)
    m, v = m.numpy(), stddev.numpy() ** 2
    np.testing.assert_allclose(kls[0], 0.5 * np.sum(v + m**2 - 1 - np.log(v), axis=1), rtol=1e-5, atol=1e-5)
    for cls in ELBO_ESTIMATORS:
        bounds = draws(cls(samples=1), model, x, 3000, seed=5)("bound")
        mean, se = bounds.mean(0), bounds.std(0, ddof=1) / np.sqrt(len(bounds))
        assert np.all(np.abs(mean - exact) <= Z * se), cls.name


def test_more_samples_reduce_the_bound_variance():
    lg = LinearGaussian.make(seed=5)
    x = tf.constant(lg.sample(4, seed=6))
    model = lg.vae(exact_encoder=False)
    one = draws(SGVBAnalyticKL(samples=1), model, x, 800)("bound")
    ten = draws(SGVBAnalyticKL(samples=10), model, x, 800, seed=1)("bound")
    # Var of a 10-sample mean is Var/10; with 800 draws each, the ratio's sampling error is ~7%.
    ratio = ten.var(0) / one.var(0)
    assert np.all(ratio < 0.2) and np.all(ratio > 0.05)


@pytest.mark.parametrize(
    "estimator",
    [
        SGVBMonteCarlo(),
        SGVBAnalyticKL(),
        StickingTheLanding(),
        ImportanceWeighted(1),
        DoublyReparameterized(1),
    ],
    ids=lambda e: e.name,
)
def test_reparameterised_gradients_are_unbiased_for_the_elbo_gradient(estimator):
    # With one sample the importance-weighted bounds are the ELBO, and DReG reduces to STL.
    lg = LinearGaussian.make(seed=7)
    x = tf.constant(lg.sample(5, seed=8))
    model = lg.vae(exact_encoder=False, perturb=0.4)
    assert_unbiased(gradient_draws(estimator, model, x, 1500), exact_gradient(lg, model, x))


def test_sticking_the_landing_has_no_variance_at_the_exact_posterior():
    lg = LinearGaussian.make(seed=9)
    x = tf.constant(lg.sample(4, seed=10))
    model = lg.vae(exact_encoder=True)
    encoder = encoder_columns(model)
    stl = gradient_draws(StickingTheLanding(), model, x, 300)[:, encoder]
    plain = gradient_draws(SGVBMonteCarlo(), model, x, 300)[:, encoder]
    # The encoder's STL gradient is d(log p(x,z) - log q(z|x))/dz dz/dphi, and that log-ratio is
    # the constant log p(x) at the exact posterior. The decoder's gradient stays random.
    assert stl.std(0).max() < 1e-3 < plain.std(0).max()


def test_dreg_estimates_the_iwae_gradient_with_less_encoder_variance():
    lg = LinearGaussian.make(seed=12)
    x = tf.constant(lg.sample(4, seed=13))
    model = lg.vae(exact_encoder=False, perturb=0.4)
    iwae = gradient_draws(ImportanceWeighted(8), model, x, 1500, seed=1)
    dreg = gradient_draws(DoublyReparameterized(8), model, x, 1500, seed=2)
    se = np.sqrt(iwae.var(0, ddof=1) / len(iwae) + dreg.var(0, ddof=1) / len(dreg))
    assert np.all(np.abs(iwae.mean(0) - dreg.mean(0)) <= Z * se + 1e-4)
    # Near the posterior the score terms DReG removes dominate the encoder's IWAE gradient noise.
    close = lg.vae(exact_encoder=False, perturb=0.1)
    encoder = encoder_columns(close)
    iwae = gradient_draws(ImportanceWeighted(8), close, x, 600, seed=3)
    dreg = gradient_draws(DoublyReparameterized(8), close, x, 600, seed=4)
    assert np.median(dreg[:, encoder].var(0) / iwae[:, encoder].var(0)) < 0.5


def test_iwae_bound_is_above_the_elbo_and_tightens_to_log_evidence():
    lg = LinearGaussian.make(seed=14)
    x = tf.constant(lg.sample(5, seed=15))
    model = lg.vae(exact_encoder=False, perturb=0.1)
    log_px = lg.log_evidence(x.numpy())
    elbo = lg.closed_form_elbo(model, x).numpy()
    means = []
    for k in (1, 4, 32, 256):
        bounds = draws(ImportanceWeighted(k), model, x, 400, seed=k)("bound")
        mean, se = bounds.mean(0), bounds.std(0, ddof=1) / np.sqrt(len(bounds))
        assert np.all(mean <= log_px + Z * se)  # still a lower bound
        means.append(mean)
    gaps = [log_px - m for m in means]
    assert np.all(means[1] > elbo) and np.all(means[3] > means[2]) and np.all(means[2] > means[1])
    assert np.all(gaps[3] < 0.25 * gaps[0])


def test_score_function_is_unbiased_noisier_and_helped_by_its_baseline():
    lg = LinearGaussian.make(seed=16)
    x = tf.constant(lg.sample(5, seed=17))
    model = lg.vae(exact_encoder=False, perturb=0.4)
    exact = exact_gradient(lg, model, x)
    plain = gradient_draws(ScoreFunction(baseline="none"), model, x, 3000, seed=3)
    assert_unbiased(plain, exact)
    encoder = encoder_columns(model)
    reparam = gradient_draws(SGVBMonteCarlo(), model, x, 3000, seed=4)
    assert np.median(plain[:, encoder].var(0) / reparam[:, encoder].var(0)) > 5.0

    with_baseline = ScoreFunction(baseline="running_mean")
    signal = draws(SGVBMonteCarlo(), model, x, 2000, seed=5)("bound")  # log p(x,z) - log q(z|x) draws
    with_baseline.running_sum.assign(float(signal.mean()))
    with_baseline.running_weight.assign(1.0)
    reduced = gradient_draws(with_baseline, model, x, 3000, seed=6)
    assert_unbiased(reduced, exact)
    assert np.median(reduced[:, encoder].var(0) / plain[:, encoder].var(0)) < 0.5


def closed_form_log_evidence(lg: LinearGaussian, model, x: tf.Tensor) -> tf.Tensor:
    """log p_theta(x) = log N(x; b, W W^T + s^2 I), differentiable in the decoder's variables."""
    kernel, bias = model.decoder.layers[-1].kernel, model.decoder.layers[-1].bias  # kernel = W^T
    cov = tf.matmul(kernel, kernel, transpose_a=True) + lg.s**2 * tf.eye(lg.data_dim)
    return tfd.MultivariateNormalTriL(loc=bias, scale_tril=tf.linalg.cholesky(cov)).log_prob(x)


def test_dreg_at_k_above_one_matches_the_closed_form_gradient_at_the_exact_posterior():
    """With q the exact posterior every importance weight is p(x): IWAE-k = log p(x) for any k.
    DReG's encoder gradient is then exactly 0 (d log w / dz = 0), and its decoder gradient
    sum_i w_i grad log p(x, z_i) with w_i = 1/k is an unbiased estimate of grad log p(x) (Fisher)."""
    lg = LinearGaussian.make(seed=18)
    x = tf.constant(lg.sample(4, seed=19))
    model = lg.vae(exact_encoder=True)
    with tf.GradientTape() as tape:
        objective = tf.reduce_mean(closed_form_log_evidence(lg, model, x))
    decoder = model.decoder.trainable_variables
    exact = np.concatenate([g.numpy().ravel() for g in tape.gradient(objective, decoder)])
    grads = gradient_draws(DoublyReparameterized(8), model, x, 1500, seed=20)
    encoder = encoder_columns(model)
    assert np.abs(grads[:, encoder]).max() < 1e-3
    assert_unbiased(grads[:, ~encoder], exact)
