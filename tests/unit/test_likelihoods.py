"""Likelihoods are normalised densities on their support, and a learned Gaussian scale has a floor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_probability import distributions as tfd

from streamvi.config import load_settings
from streamvi.errors import ConfigError
from streamvi.estimators import build_estimator
from streamvi.model.likelihoods import ContinuousBernoulliLikelihood, GaussianLikelihood
from streamvi.model.vae import build_vae
from streamvi.runtime import build_trainer
from streamvi.training.trainer import Trainer

LOGITS = np.array([-6.0, -2.0, -0.3, -1e-3, 0.0, 1e-3, 0.7, 3.0, 8.0], np.float32)


def continuous_bernoulli_log_density(x: np.ndarray, logit: float) -> np.ndarray:
    """log C(l) + x log l + (1 - x) log(1 - l), C(l) = 2 artanh(1 - 2l) / (1 - 2l) (C(1/2) = 2), float64."""
    lam = 1.0 / (1.0 + math.exp(-logit))
    norm = 2.0 if abs(lam - 0.5) < 1e-6 else 2.0 * math.atanh(1.0 - 2.0 * lam) / (1.0 - 2.0 * lam)
    return math.log(norm) + x * math.log(lam) + (1.0 - x) * math.log1p(-lam)


def test_continuous_bernoulli_density_integrates_to_one_and_matches_the_closed_form():
    likelihood = ContinuousBernoulliLikelihood(len(LOGITS))
    grid = np.linspace(0.0, 1.0, 20_001)
    # one row per grid point, one column per logit: each column is a density over [0, 1]
    x = np.repeat(grid[:, None], len(LOGITS), axis=1).astype(np.float32)
    params = tf.constant(np.broadcast_to(LOGITS, x.shape))
    per_dim = likelihood.distribution(params).distribution.log_prob(x).numpy()  # [grid, logits]
    mass = np.trapezoid(np.exp(per_dim.astype(np.float64)), grid, axis=0)
    # trapezoid error on 20k intervals is O(1e-9) for these smooth densities; float32 log-densities
    # carry ~1e-6 relative error, which bounds the tolerance
    np.testing.assert_allclose(mass, 1.0, atol=2e-5)
    for j, logit in enumerate(LOGITS):
        expected = continuous_bernoulli_log_density(grid[::1000], float(logit))
        np.testing.assert_allclose(per_dim[::1000, j], expected, rtol=2e-5, atol=2e-5)


def test_continuous_bernoulli_likelihood_is_tfps_independent_over_dimensions():
    likelihood = ContinuousBernoulliLikelihood(len(LOGITS))
    rng = np.random.default_rng(0)
    x = rng.random((5, len(LOGITS))).astype(np.float32)
    params = tf.constant(np.tile(LOGITS, (5, 1)))
    ours = likelihood.distribution(params).log_prob(x).numpy()
    theirs = tf.reduce_sum(tfd.ContinuousBernoulli(logits=params).log_prob(x), axis=-1).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert likelihood.distribution(params).event_shape == (len(LOGITS),)


def test_continuous_bernoulli_trains_on_grey_levels():
    settings = load_settings(
        overrides=[
            "input.dim=6",
            "model.likelihood=continuous_bernoulli",
            "model.encoder_hidden=[16]",
            "model.latent_dim=2",
            "training.batch_size=32",
        ],
        environ={},
    )
    trainer = build_trainer(settings)
    x = np.random.default_rng(1).beta(2.0, 5.0, size=(32, 6)).astype(np.float32)
    first = trainer.train(x, 32)
    for _ in range(30):
        last = trainer.train(x, 32)
    assert np.isfinite(first.loss) and last.scores.bound.mean() > first.scores.bound.mean()


def constant_column_trainer(floor: float) -> Trainer:
    """A Gaussian model with a learned scale whose decoder predicts the constant columns exactly.

    The decoder is linear and frozen with mean 0 for the three noisy columns and 0.5 for the three
    constant ones: the limit a trained decoder approaches, where only the scale can still move.
    """
    settings = load_settings(
        overrides=[
            "input.dim=6",
            "model.likelihood=gaussian",
            "model.learn_observation_scale=true",
            "model.observation_scale=1.0",
            f"model.min_observation_scale={floor}",
            "model.encoder_hidden=[]",
            "model.decoder_hidden=[]",
            "model.latent_dim=2",
            "training.batch_size=64",
            "training.learning_rate=0.05",
            "training.clip_grad_norm=null",
        ],
        environ={},
    )
    model = build_vae(settings.model, settings.training, settings.input.dim)
    layer = model.decoder.layers[-1]
    layer.set_weights([np.zeros((2, 6), np.float32), np.array([0, 0, 0, 0.5, 0.5, 0.5], np.float32)])
    model.decoder.trainable = False
    return Trainer.from_settings(model, build_estimator(settings), settings.training)


def stream_with_constant_columns(trainer: Trainer, steps: int) -> float:
    """Train on a stream whose last three columns never change; return the last batch's mean bound."""
    rng = np.random.default_rng(2)
    bound = float("nan")
    for _ in range(steps):
        x = np.empty((64, 6), np.float32)
        x[:, :3] = rng.normal(size=(64, 3))
        x[:, 3:] = 0.5
        bound = float(trainer.train(x, 64).scores.bound.mean())
    return bound


def test_a_learned_observation_scale_stops_at_its_floor_on_constant_columns():
    floor, steps = 1e-3, 600
    # with every scale at the floor, no record's log-density can exceed D (-log(floor) - log(2 pi)/2)
    ceiling = 6 * (-math.log(floor) - 0.5 * math.log(2 * math.pi))
    floored = constant_column_trainer(floor)
    bound = stream_with_constant_columns(floored, steps)
    scale = floored.model.likelihood.observation_scale().numpy()
    assert np.all(scale >= floor) and scale[3:].max() < 1.05 * floor  # it went down to the floor
    assert bound < ceiling
    # The same stream with a negligible floor shows what the floor prevents: the scale of the
    # constant columns falls geometrically towards 0 and the bound rises past any fixed value.
    unfloored = constant_column_trainer(1e-30)
    loose = stream_with_constant_columns(unfloored, steps)
    assert unfloored.model.likelihood.observation_scale().numpy()[3:].max() < 1e-8
    assert loose > ceiling + 10.0


def test_the_floor_must_be_below_the_initial_learned_scale():
    with pytest.raises(ConfigError, match="min_observation_scale"):
        load_settings(
            overrides=[
                "model.likelihood=gaussian",
                "model.learn_observation_scale=true",
                "model.observation_scale=0.001",
                "model.min_observation_scale=0.01",
            ],
            environ={},
        )
    with pytest.raises(ValueError, match="floor"):
        GaussianLikelihood(4, 0.001, learned=True, min_scale=0.01)
