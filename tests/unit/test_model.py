from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats
from tensorflow_probability import distributions as tfd

from streamvi.config import load_settings
from streamvi.model import GumbelSoftmax, build_vae

STEP = tf.constant(0, tf.int64)


def settings(*overrides: str):
    return load_settings(overrides=list(overrides), environ={})


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "poisson", "binomial"])
@pytest.mark.parametrize("latent", ["gaussian", "gumbel_softmax"])
def test_shapes_and_distributions(likelihood, latent):
    s = settings(
        *(
            ["model.latent_dim=3"]
            if latent == "gaussian"
            else ["model.categorical_variables=2", "model.categories=4"]
        ),
        *(["model.binomial_total_count=1"] if likelihood == "binomial" else []),
        "model.encoder_hidden=[16, 8]",
        f"model.likelihood={likelihood}",
        f"model.latent={latent}",
    )
    model = build_vae(s.model, s.training, 7, context_dim=2)
    x = tf.constant(np.random.default_rng(0).integers(0, 2, (5, 7)), tf.float32)
    c = tf.ones((5, 2))
    params = model.encode(x, c)
    sample = model.latent.sample(params, 4, tf.constant([1, 2]), STEP)
    size = 3 if latent == "gaussian" else 8
    assert sample.decoder_input.shape == (4, 5, size)
    for field in (sample.log_q, sample.log_q_stopped, sample.log_prior):
        assert field.shape == (4, 5) and np.isfinite(field.numpy()).all()
    p = model.observation(sample.decoder_input, c)
    assert p.batch_shape == (4, 5) and p.event_shape == (7,)
    assert np.isfinite(p.log_prob(x).numpy()).all()
    loc, scale = model.latent.summary(params, STEP)
    assert loc.shape == scale.shape == (5, size) and np.all(scale.numpy() >= 0)
    assert [layer.units for layer in model.decoder.layers] == [8, 16, 7]  # mirrored encoder
    assert model.encoder.layers[0].kernel.shape[0] == 9  # x and c
    assert model.decoder.layers[0].kernel.shape[0] == size + 2  # z and c


def test_gaussian_kl_matches_tfp():
    s = settings("model.latent_dim=3")
    model = build_vae(s.model, s.training, 4)
    params = tf.random.stateless_normal((6, 6), seed=(3, 4))
    loc, scale = model.latent.summary(params, STEP)
    expected = tfd.kl_divergence(
        tfd.MultivariateNormalDiag(loc, scale), tfd.MultivariateNormalDiag(tf.zeros(3))
    )
    np.testing.assert_allclose(model.latent.analytic_kl(params, STEP).numpy(), expected.numpy(), rtol=1e-5)


def test_bernoulli_log_prob_is_cross_entropy_on_soft_targets():
    s = settings("model.latent_dim=1")
    model = build_vae(s.model, s.training, 2)
    logits = tf.constant([[0.3, -1.2]])
    x = tf.constant([[0.25, 1.0]])
    got = model.likelihood.distribution(logits).log_prob(x).numpy()
    p = 1 / (1 + np.exp(-logits.numpy()))
    expected = np.sum(x.numpy() * np.log(p) + (1 - x.numpy()) * np.log(1 - p), axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gaussian_likelihood_fixed_and_learned_scale():
    s = settings("model.likelihood=gaussian", "model.observation_scale=0.5")
    fixed = build_vae(s.model, s.training, 3)
    np.testing.assert_allclose(fixed.likelihood.distribution(tf.zeros((1, 3))).stddev().numpy(), 0.5)
    assert not fixed.likelihood.trainable_variables
    s = settings(
        "model.likelihood=gaussian", "model.observation_scale=0.5", "model.learn_observation_scale=true"
    )
    learned = build_vae(s.model, s.training, 3)
    assert learned.likelihood.log_scale.ref() in {v.ref() for v in learned.trainable_variables}
    np.testing.assert_allclose(
        learned.likelihood.distribution(tf.zeros((1, 3))).stddev().numpy(), 0.5, rtol=1e-6
    )


def test_poisson_likelihood_matches_scipy():
    s = settings("model.likelihood=poisson")
    model = build_vae(s.model, s.training, 3)
    log_rate = tf.constant([[0.0, 1.0, -1.0]])
    x = tf.constant([[0.0, 3.0, 1.0]])
    expected = stats.poisson(np.exp(log_rate.numpy())).logpmf(x.numpy()).sum()
    np.testing.assert_allclose(
        model.likelihood.distribution(log_rate).log_prob(x).numpy(), [expected], rtol=1e-5
    )


def test_binomial_likelihood_matches_scipy():
    s = settings("model.likelihood=binomial", "model.binomial_total_count=16")
    model = build_vae(s.model, s.training, 4)
    logits = tf.constant([[0.0, 1.5, -2.0, 0.3], [-0.7, 4.0, 0.1, -3.0]])
    x = tf.constant([[0.0, 16.0, 3.0, 9.0], [5.0, 15.0, 16.0, 0.0]])
    p = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
    expected = stats.binom(16, p).logpmf(x.numpy()).sum(axis=1)
    got = model.likelihood.distribution(logits).log_prob(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # a probability mass: over all 17 counts of one dimension it sums to 1, so log p(x|z) <= 0
    counts = tf.range(17, dtype=tf.float32)[:, None]
    mass = tf.exp(model.likelihood.distribution(tf.fill([17, 4], 0.8)).distribution.log_prob(counts))
    np.testing.assert_allclose(tf.reduce_sum(mass, axis=0).numpy(), 1.0, rtol=1e-5)


def gumbel(k: int = 6, **kwargs) -> GumbelSoftmax:
    return GumbelSoftmax(1, k, **kwargs)


def test_gumbel_max_sampling_is_exact():
    """argmax of a relaxed sample is argmax(logits + Gumbel noise), an exact categorical draw."""
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    logits = tf.constant(np.log(probs)[None, :], tf.float32)
    n = 20_000
    sample = gumbel(temperature_start=0.7, temperature_floor=0.7).sample(logits, n, tf.constant([5, 6]), STEP)
    counts = np.bincount(np.argmax(sample.decoder_input.numpy()[:, 0, :], axis=-1), minlength=6)
    _, p_value = stats.chisquare(counts, probs * n)
    assert p_value > 1e-3  # a fixed seed; 1e-3 is the chance a correct sampler would fail


def test_relaxed_samples_approach_one_hot_as_temperature_falls():
    logits = tf.zeros((1, 6))
    sharpness = []
    for tau in (2.0, 1.0, 0.3, 0.05, 0.005):
        sample = gumbel(temperature_start=tau, temperature_floor=tau).sample(
            logits, 2000, tf.constant([7, 8]), STEP
        )
        z = sample.decoder_input.numpy()[:, 0, :]
        np.testing.assert_allclose(z.sum(-1), 1.0, rtol=1e-5)  # points on the simplex
        sharpness.append(z.max(-1).mean())
    assert sharpness == sorted(sharpness) and sharpness[-1] > 0.99 and sharpness[0] < 0.6


def test_temperature_anneals_from_start_to_floor():
    family = gumbel(temperature_start=2.0, temperature_floor=0.5, temperature_rate=1e-3)
    taus = [float(family.temperature(tf.constant(step, tf.int64))) for step in (0, 100, 1000, 10_000)]
    assert taus[0] == pytest.approx(2.0) and taus[-1] == pytest.approx(0.5)
    assert taus == sorted(taus, reverse=True)
    assert taus[1] == pytest.approx(2.0 * np.exp(-0.1), rel=1e-5)


def test_straight_through_is_one_hot_forward_with_soft_gradients():
    logits = tf.Variable(tf.random.stateless_normal((3, 2 * 4), seed=(1, 1)))
    family = GumbelSoftmax(2, 4, straight_through=True)
    with tf.GradientTape() as tape:
        z = family.sample(logits, 5, tf.constant([9, 9]), STEP).decoder_input
        objective = tf.reduce_sum(z * tf.range(8, dtype=tf.float32))
    values = z.numpy().reshape(5, 3, 2, 4)
    assert set(np.unique(values)) <= {0.0, 1.0} and np.all(values.sum(-1) == 1.0)
    assert np.abs(tape.gradient(objective, logits).numpy()).max() > 0


def test_discrete_samples_for_the_score_function_are_exact_one_hot():
    logits = tf.constant([[0.0, 1.0, 2.0]])
    sample = GumbelSoftmax(1, 3).sample(logits, 4000, tf.constant([2, 3]), STEP, reparameterized=False)
    z = sample.decoder_input.numpy()[:, 0, :]
    assert set(np.unique(z)) == {0.0, 1.0}
    expected = np.log(np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum())
    np.testing.assert_allclose(sample.log_q.numpy()[:, 0], expected[z.argmax(-1)], rtol=1e-5)
    np.testing.assert_allclose(sample.log_prior.numpy(), np.log(1 / 3), rtol=1e-6)


def test_gumbel_analytic_kl_is_the_categorical_kl_to_uniform():
    family = GumbelSoftmax(2, 5)
    params = tf.random.stateless_normal((4, 10), seed=(2, 2))
    logits = tf.reshape(params, (4, 2, 5))
    expected = tf.reduce_sum(
        tfd.kl_divergence(tfd.Categorical(logits=logits), tfd.Categorical(logits=tf.zeros_like(logits))), -1
    )
    np.testing.assert_allclose(family.analytic_kl(params, STEP).numpy(), expected.numpy(), rtol=1e-5)
    probs, _ = family.summary(params, STEP)
    np.testing.assert_allclose(probs.numpy().reshape(4, 2, 5).sum(-1), 1.0, rtol=1e-5)
