"""SGVB estimator B against the closed-form linear-Gaussian model; tolerances are Monte Carlo errors."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from streamvi.estimators import SGVBAnalyticKL
from tests.unit.linear_gaussian import LinearGaussian

# Two-sided normal quantile for a per-check false-alarm rate of about 1e-5; the seeds are fixed,
# so this bounds how unlucky a seed would have to be, not a flakiness rate.
Z = 4.4


def draws(estimator, model, x, n, seed=0):
    """``n`` independent evaluations of every record of ``x``, as one batch of ``n`` tiled copies.

    Every row draws its own latent sample, so row r of copy i is an independent draw for record r.
    Returns a function of a BoundTerms field name giving an array of shape [n, len(x)].
    """
    tiled = tf.tile(x, [n, 1])
    terms = estimator.terms(model, tiled, tf.constant([seed, 0], tf.int32))
    batch = int(x.shape[0])
    return lambda name: getattr(terms, name).numpy().reshape(n, batch)


def test_bound_at_exact_posterior_is_log_evidence():
    lg = LinearGaussian.make()
    x = tf.constant(lg.sample(6))
    model = lg.vae(exact_encoder=True)
    np.testing.assert_allclose(
        lg.closed_form_elbo(model, x).numpy(), lg.log_evidence(x.numpy()), rtol=1e-4, atol=1e-3
    )
    bounds = draws(SGVBAnalyticKL(samples=1), model, x, 2000)("bound")
    mean, se = bounds.mean(0), bounds.std(0, ddof=1) / np.sqrt(len(bounds))
    assert np.all(np.abs(mean - lg.log_evidence(x.numpy())) <= Z * se + 1e-4)


def test_kl_is_analytic_and_bound_mean_matches_closed_form_elbo():
    lg = LinearGaussian.make(seed=3)
    x = tf.constant(lg.sample(8, seed=4))
    model = lg.vae(exact_encoder=False)
    exact = lg.closed_form_elbo(model, x).numpy()
    assert np.all(exact < lg.log_evidence(x.numpy()))  # a worse q has a strictly lower bound
    terms = draws(SGVBAnalyticKL(samples=1), model, x, 3000)
    kls = terms("kl")
    assert np.ptp(kls, axis=0).max() == 0.0  # analytic: no sampling variance
    q = model.posterior(x)
    m, v = q.mean().numpy(), q.variance().numpy()
    np.testing.assert_allclose(kls[0], 0.5 * np.sum(v + m**2 - 1 - np.log(v), axis=1), rtol=1e-5, atol=1e-5)
    bounds = terms("bound")
    mean, se = bounds.mean(0), bounds.std(0, ddof=1) / np.sqrt(len(bounds))
    assert np.all(np.abs(mean - exact) <= Z * se)


def test_more_samples_reduce_the_bound_variance():
    lg = LinearGaussian.make(seed=5)
    x = tf.constant(lg.sample(4, seed=6))
    model = lg.vae(exact_encoder=False)
    one = draws(SGVBAnalyticKL(samples=1), model, x, 800)("bound")
    ten = draws(SGVBAnalyticKL(samples=10), model, x, 800, seed=1)("bound")
    # Var of a 10-sample mean is Var/10; with 800 draws each, the ratio's sampling error is ~7%.
    ratio = ten.var(0) / one.var(0)
    assert np.all(ratio < 0.2) and np.all(ratio > 0.05)


def test_gradient_is_unbiased_for_the_closed_form_elbo_gradient():
    lg = LinearGaussian.make(seed=7)
    x = tf.constant(lg.sample(5, seed=8))
    model = lg.vae(exact_encoder=False, perturb=0.4)
    variables = model.trainable_variables
    estimator = SGVBAnalyticKL(samples=1)

    with tf.GradientTape() as tape:
        exact_objective = tf.reduce_mean(lg.closed_form_elbo(model, x))
    exact = np.concatenate([g.numpy().ravel() for g in tape.gradient(exact_objective, variables)])

    n = 3000
    tiled = tf.tile(x, [n, 1])
    with tf.GradientTape() as tape:
        surrogate = estimator.terms(model, tiled, tf.constant([11, 0], tf.int32)).surrogate
        per_draw = tf.reduce_mean(tf.reshape(surrogate, [n, -1]), axis=1)  # [n] independent objectives
    jacobians = tape.jacobian(per_draw, variables)
    grads = np.concatenate([j.numpy().reshape(n, -1) for j in jacobians], axis=1)
    mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(len(grads))
    # Some coordinates have no sampling noise at all (the KL part of the encoder's gradient is exact).
    assert np.all(np.abs(mean - exact) <= Z * se + 1e-4 * (1 + np.abs(exact)))
    assert np.abs(exact).max() > 0.1  # the check is not vacuous
