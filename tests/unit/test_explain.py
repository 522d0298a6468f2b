"""Explanations of a low reconstruction term: per-group log-likelihoods at the posterior location,
their lowest k, and the JSON a latents message carries."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
import tensorflow as tf
from scipy import stats

from streamvi.anomaly.explain import explanation_json, group_names, top_contributions
from streamvi.config import load_settings
from streamvi.features.schema import FeatureLayout
from streamvi.model.vae import VAE, build_vae

STEP = tf.constant(0, tf.int64)
SCALE = 0.5
DIM = 6
SCHEMA = [
    {"name": "temperature"},
    {"name": "up", "type": "binary"},
    {"name": "errors", "type": "count"},
    {"name": "kind", "type": "categorical", "vocabulary": ["a", "b", "c"]},
    {"name": "host", "type": "hashed", "buckets": 4},
    {"name": "load"},
]


def gaussian_vae(latent: str = "gaussian") -> VAE:
    latent_options = (
        ["model.latent_dim=2"]
        if latent == "gaussian"
        else ["model.categorical_variables=2", "model.categories=3"]
    )
    s = load_settings(
        overrides=[
            f"model.latent={latent}",
            *latent_options,
            "model.likelihood=gaussian",
            f"model.observation_scale={SCALE}",
            "model.encoder_hidden=[8]",
            "training.seed=3",
        ],
        environ={},
    )
    return build_vae(s.model, s.training, DIM)


def data(rows: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, DIM)).astype(np.float32)


def empty_context(rows: int) -> tf.Tensor:
    return tf.zeros((rows, 0))


def test_per_dimension_gaussian_terms_sum_to_the_observation_and_match_the_closed_form():
    model = gaussian_vae()
    x = data()
    c = empty_context(len(x))
    per_dim = model.dimension_log_likelihood(tf.constant(x), c).numpy()
    assert per_dim.shape == (len(x), DIM) and per_dim.dtype == np.float32
    z_loc, _ = model.latent.summary(model.encode(x, c), STEP)
    observation = model.observation(z_loc, c)
    np.testing.assert_allclose(per_dim.sum(axis=1), observation.log_prob(x).numpy(), rtol=1e-5, atol=1e-5)
    mean = observation.mean().numpy().astype(np.float64)
    expected = stats.norm(mean, SCALE).logpdf(x.astype(np.float64))
    np.testing.assert_allclose(per_dim, expected, rtol=1e-5, atol=1e-5)


def test_it_compiles_under_xla_and_agrees_with_eager():
    model = gaussian_vae()
    x = tf.constant(data())
    c = empty_context(16)
    compiled = tf.function(model.dimension_log_likelihood, jit_compile=True)
    np.testing.assert_allclose(
        compiled(x, c).numpy(), model.dimension_log_likelihood(x, c).numpy(), rtol=1e-5, atol=1e-5
    )


def test_gumbel_softmax_latents_are_decoded_at_the_most_probable_class():
    model = gaussian_vae("gumbel_softmax")
    x = data()
    c = empty_context(len(x))
    per_dim = model.dimension_log_likelihood(tf.constant(x), c).numpy()
    probs, _ = model.latent.summary(model.encode(x, c), STEP)
    hot = np.eye(3, dtype=np.float32)[probs.numpy().reshape(-1, 2, 3).argmax(axis=-1)].reshape(-1, 6)
    expected = model.observation(tf.constant(hot), c).log_prob(x).numpy()
    np.testing.assert_allclose(per_dim.sum(axis=1), expected, rtol=1e-5, atol=1e-5)


def test_the_corrupted_dimension_is_the_top_contribution():
    model = gaussian_vae()
    x = data()
    corrupted = 3
    x[:, corrupted] = 25.0
    per_dim = model.dimension_log_likelihood(tf.constant(x), empty_context(len(x)))
    indices, values = top_contributions(per_dim, 2)
    assert indices.dtype == tf.int32 and values.dtype == tf.float32
    assert indices.shape == values.shape == (len(x), 2)
    assert (indices.numpy()[:, 0] == corrupted).all()
    np.testing.assert_array_equal(values.numpy()[:, 0], per_dim.numpy()[:, corrupted])
    assert (values.numpy()[:, 0] <= values.numpy()[:, 1]).all()  # most negative first
    assert group_names(model)[corrupted] == "x[3]"


def schema_vae() -> VAE:
    s = load_settings(
        overrides=[
            f"input.features={orjson.dumps(SCHEMA).decode()}",
            "input.normalise_warmup=4",
            "model.latent_dim=2",
            "model.encoder_hidden=[8]",
            "training.seed=5",
        ],
        environ={},
    )
    model = build_vae(s.model, s.training, s.input.dim, inputs=s.input)
    return model


def schema_records() -> np.ndarray:
    # temperature, up, errors, kind, host, load; NaN = not observed
    return np.array(
        [
            [21.5, 1.0, 3.0, 2.0, 1.0, 0.4],
            [18.0, 0.0, 0.0, 0.0, 3.0, np.nan],
            [np.nan, 1.0, 7.0, np.nan, 0.0, 0.9],
            [25.0, np.nan, 1.0, 1.0, np.nan, 0.1],
        ],
        np.float32,
    )


def test_feature_schema_parts_are_one_column_per_feature_and_sum_to_the_log_likelihood():
    model = schema_vae()
    x = schema_records()
    model.fold(tf.constant(x), tf.ones([len(x)], tf.bool))
    c = empty_context(len(x))
    per_feature = model.dimension_log_likelihood(tf.constant(x), c).numpy()
    assert per_feature.shape == (len(x), len(SCHEMA))  # the categoricals are one column each
    assert model.likelihood.param_size > len(SCHEMA)
    z_loc, _ = model.latent.summary(model.encode(x, c), STEP)
    observation = model.observation(z_loc, c)
    parts = observation.log_prob_parts(x).numpy()
    np.testing.assert_array_equal(parts, per_feature)
    np.testing.assert_allclose(parts.sum(axis=1), observation.log_prob(x).numpy(), rtol=1e-6, atol=1e-5)
    masked = np.isnan(x)
    assert (parts[masked] == 0.0).all() and (parts[~masked] != 0.0).all()
    assert np.isfinite(parts).all()
    # the categorical column is the log-softmax mass of the observed class
    logits = observation._split()["categorical"][0].numpy()
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(parts[0, 3], log_softmax[0, 2], rtol=1e-5)
    names = [feature["name"] for feature in SCHEMA]
    assert group_names(model) == names
    assert group_names(model.likelihood.layout, 99) == names
    assert isinstance(model.likelihood.layout, FeatureLayout)
    compiled = tf.function(model.dimension_log_likelihood, jit_compile=True)
    np.testing.assert_allclose(compiled(tf.constant(x), c).numpy(), per_feature, rtol=1e-5, atol=1e-5)


def test_group_names_of_a_plain_vector():
    assert group_names(None, 3) == ["x[0]", "x[1]", "x[2]"]
    with pytest.raises(ValueError):
        group_names(None)


def test_explanation_json_round_trips_with_names_and_null_for_non_finite():
    indices = np.array([[2, 0], [1, 2]], np.int32)
    values = np.array([[-12.5, -1.25], [np.nan, -np.inf]], np.float32)
    out = explanation_json(indices, values, ["a", "b", "c"])
    assert all(isinstance(item, bytes) for item in out)
    assert orjson.loads(out[0]) == [
        {"feature": "c", "log_likelihood": -12.5},
        {"feature": "a", "log_likelihood": -1.25},
    ]
    assert orjson.loads(out[1]) == [
        {"feature": "b", "log_likelihood": None},
        {"feature": "c", "log_likelihood": None},
    ]
    third = np.array([[-math.pi]], np.float32)
    (text,) = explanation_json(np.zeros((1, 1), np.int32), third, ["x[0]"])
    assert np.float32(orjson.loads(text)[0]["log_likelihood"]) == third[0, 0]


def test_top_contributions_clips_k_to_the_number_of_groups():
    per_group = tf.constant([[-1.0, -5.0, 0.5], [-2.0, -0.1, -3.0]])
    indices, values = top_contributions(per_group, 10)
    assert indices.shape == values.shape == (2, 3)
    np.testing.assert_array_equal(indices.numpy(), [[1, 0, 2], [2, 0, 1]])
    np.testing.assert_array_equal(values.numpy(), np.float32([[-5.0, -1.0, 0.5], [-3.0, -2.0, -0.1]]))
    compiled = tf.function(lambda t: top_contributions(t, 10), jit_compile=True)
    np.testing.assert_array_equal(compiled(per_group)[0].numpy(), indices.numpy())
