from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from streamvi.config import load_settings
from streamvi.model import build_vae


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_shapes_and_distributions(likelihood):
    settings = load_settings(
        overrides=[
            "input.dim=7",
            "model.latent_dim=3",
            "model.encoder_hidden=[16, 8]",
            f"model.likelihood={likelihood}",
        ],
        environ={},
    )
    model = build_vae(settings.model, settings.training, 7)
    x = tf.constant(np.random.default_rng(0).random((5, 7)), tf.float32)
    q = model.posterior(x)
    assert q.batch_shape == (5,) and q.event_shape == (3,)
    assert np.all(q.stddev().numpy() >= settings.model.min_posterior_scale)
    z = q.sample(4, seed=(1, 2))
    p = model.observation(z)
    assert p.batch_shape == (4, 5) and p.event_shape == (7,)
    assert np.isfinite(p.log_prob(x).numpy()).all()
    prior = model.prior(tf.constant([5]))
    np.testing.assert_allclose(prior.mean().numpy(), 0.0)
    np.testing.assert_allclose(prior.stddev().numpy(), 1.0)
    assert [layer.units for layer in model.decoder.layers] == [8, 16, 7]  # mirrored encoder


def test_bernoulli_log_prob_is_cross_entropy_on_soft_targets():
    settings = load_settings(overrides=["input.dim=2", "model.latent_dim=1"], environ={})
    model = build_vae(settings.model, settings.training, 2)
    logits = tf.constant([[0.3, -1.2]])
    x = tf.constant([[0.25, 1.0]])
    got = model.likelihood.distribution(logits).log_prob(x).numpy()
    p = 1 / (1 + np.exp(-logits.numpy()))
    expected = np.sum(x.numpy() * np.log(p) + (1 - x.numpy()) * np.log(1 - p), axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gaussian_likelihood_uses_the_configured_scale():
    settings = load_settings(
        overrides=["input.dim=3", "model.likelihood=gaussian", "model.observation_scale=0.5"], environ={}
    )
    model = build_vae(settings.model, settings.training, 3)
    dist = model.likelihood.distribution(tf.zeros((1, 3)))
    np.testing.assert_allclose(dist.stddev().numpy(), 0.5)
