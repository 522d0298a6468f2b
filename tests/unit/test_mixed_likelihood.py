"""The mixed-type likelihood under a feature schema: masked dimensions leave the bound, which then
equals a closed-form marginal, and the product density is a true density of the raw values."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
import tensorflow as tf
from scipy import stats

from streamvi.config import load_settings
from streamvi.features.normaliser import RunningMoments
from streamvi.features.schema import FeatureLayout, FeatureSpec
from streamvi.model.mixed import MIN_NUMERIC_SCALE, FeatureInputs, MixedLikelihood
from streamvi.runtime import build_trainer

# A linear Gaussian model with one latent: z ~ N(0, 1), x = W z + b + sigma eps, four numeric features.
W = np.array([1.0, -0.5, 2.0, 0.3])
B = np.array([0.2, -1.0, 0.5, 3.0])
SIGMA = 0.5


def linear_gaussian_trainer():
    features = [{"name": f"x{j}"} for j in range(4)]
    settings = load_settings(
        overrides=[
            f"input.features={orjson.dumps(features).decode()}",
            "input.normalise=false",
            "model.latent_dim=1",
            "model.encoder_hidden=[]",
            "model.decoder_hidden=[]",
            "training.estimator=sgvb_a",
            "training.batch_size=64",
        ],
        environ={},
    )
    trainer = build_trainer(settings)
    model = trainer.model
    decoder = model.decoder.layers[-1]
    decoder.kernel.assign(W[None, :].astype(np.float32))
    decoder.bias.assign(B.astype(np.float32))
    model.likelihood.log_scale.assign(np.full(4, math.log(SIGMA - MIN_NUMERIC_SCALE), np.float32))
    return trainer


def set_exact_posterior(trainer, observed: np.ndarray) -> None:
    """Encoder weights giving q(z|x) = p(z|x_O) for records observed on the columns ``observed``:
    var = 1 / (1 + sum_O W^2 / sigma^2), mean = var sum_O W (x - b) / sigma^2 (linear in x)."""
    var = 1.0 / (1.0 + np.sum(W[observed] ** 2) / SIGMA**2)
    gain = np.where(observed, var * W / SIGMA**2, 0.0)
    kernel = np.zeros((8, 2))  # encoder input: the 4 filled values, then the 4 mask bits
    kernel[:4, 0] = gain
    min_scale = trainer.model.latent.min_scale
    raw_scale = np.log(np.expm1(math.sqrt(var) - min_scale))  # softplus(raw) + min_scale = sd
    encoder = trainer.model.encoder.layers[-1]
    encoder.kernel.assign(kernel.astype(np.float32))
    encoder.bias.assign(np.array([-np.sum(gain * B), raw_scale], np.float32))


@pytest.mark.parametrize(
    "observed",
    [[True, True, True, True], [True, False, True, False], [False, False, False, True]],
    ids=["all", "half", "one"],
)
def test_the_bound_on_masked_records_is_the_closed_form_marginal_of_the_observed_part(observed):
    observed = np.array(observed)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 1))
    x = (z * W + B + SIGMA * rng.normal(size=(64, 4))).astype(np.float32)
    trainer = linear_gaussian_trainer()
    set_exact_posterior(trainer, observed)
    masked = np.where(observed, x, np.nan).astype(np.float32)
    bound = trainer.evaluate(masked).bound
    # log p(x_O) = log N(x_O; b_O, W_O W_O' + sigma^2 I)
    cov = np.outer(W[observed], W[observed]) + SIGMA**2 * np.eye(observed.sum())
    exact = stats.multivariate_normal(B[observed], cov).logpdf(x[:, observed].astype(np.float64))
    # With q the exact posterior, log p(x_O, z) - log q(z | x_O) = log p(x_O) for every draw z: the
    # one-sample estimator A has no Monte Carlo error, only float32 rounding (~1e-6 relative).
    np.testing.assert_allclose(bound, exact, rtol=1e-4, atol=1e-4)
    if not observed.all():  # the missing columns really are out of the bound
        assert (
            np.abs(trainer.evaluate(np.where(observed, x, 0.0).astype(np.float32)).bound - exact).max() > 0.1
        )


#: scipy's density of the numeric feature, per numeric likelihood (the Student-t's df is the test's).
NUMERIC = {
    "gaussian": lambda loc, sd: stats.norm(loc, sd),
    "student_t": lambda loc, sd: stats.t(3.0, loc, sd),
}


def mixed_model(numeric: str = "gaussian"):
    specs = (
        FeatureSpec(name="temperature"),
        FeatureSpec(name="up", type="binary"),
        FeatureSpec(name="errors", type="count"),
        FeatureSpec(name="kind", type="categorical", vocabulary=["a", "b", "c"]),
    )
    layout = FeatureLayout(specs)
    moments = RunningMoments(1, warmup=2)
    moments.fold(tf.constant([[15.0], [25.0], [20.0]]), tf.constant([True, True, True]))  # mean 20, sd 4.08
    inputs = FeatureInputs(layout, moments)
    likelihood = MixedLikelihood(layout, inputs, numeric)
    likelihood.log_scale.assign([math.log(0.7 - MIN_NUMERIC_SCALE)])
    if likelihood.log_df is not None:
        likelihood.log_df.assign([math.log(3.0 - 1.0)])  # df = 1 + exp(log_df) = 3
    # decoder outputs: numeric loc (standardised), binary logit, count log-rate, three class logits
    params = tf.constant([[0.3, -0.4, math.log(2.5), 0.1, 1.2, -0.7]])
    return likelihood, params, moments


@pytest.mark.parametrize("numeric", sorted(NUMERIC))
def test_the_mixed_log_likelihood_is_the_sum_of_each_features_density_in_raw_units(numeric):
    likelihood, params, moments = mixed_model(numeric)
    loc, scale = (float(v.numpy()[0]) for v in moments.location_scale())
    x = np.array([[23.0, 1.0, 4.0, 2.0], [np.nan, 0.0, np.nan, 0.0]], np.float32)
    got = likelihood.distribution(tf.repeat(params, 2, axis=0)).log_prob(x).numpy()
    classes = stats.multinomial(1, np.exp(params.numpy()[0, 3:]) / np.exp(params.numpy()[0, 3:]).sum())
    p_up = 1.0 / (1.0 + math.exp(0.4))
    first = (
        NUMERIC[numeric](loc + 0.3 * scale, 0.7 * scale).logpdf(23.0)
        + math.log(p_up)
        + stats.poisson(2.5).logpmf(4)
        + classes.logpmf([0, 0, 1])
    )
    second = math.log(1 - p_up) + classes.logpmf([1, 0, 0])  # two masked features: left out
    np.testing.assert_allclose(got, [first, second], rtol=1e-5)


@pytest.mark.parametrize("numeric", sorted(NUMERIC))
def test_the_mixed_likelihood_is_a_true_density_it_sums_and_integrates_to_one(numeric):
    likelihood, params, moments = mixed_model(numeric)
    loc, scale = (float(v.numpy()[0]) for v in moments.location_scale())
    grid = np.linspace(-20.0, 60.0, 8001)  # the raw temperature: sd 0.7 x 4.08 around 21.2
    total = 0.0
    for up in (0.0, 1.0):
        for errors in range(40):  # Poisson(2.5) beyond 40 has mass < 1e-30
            for kind in (0.0, 1.0, 2.0):
                x = np.stack([grid, *(np.full_like(grid, v) for v in (up, errors, kind))], axis=1)
                density = np.exp(likelihood.distribution(params).log_prob(x.astype(np.float32)).numpy())
                total += np.trapezoid(density.astype(np.float64), grid)
    # the numeric density's mass on the grid (a Student-t's tails reach past it: ~7e-4 at df 3);
    # trapezoid error on a 0.01 grid is ~1e-8 here; float32 log-densities ~1e-6 relative
    numeric_density = NUMERIC[numeric](loc + 0.3 * scale, 0.7 * scale)
    on_grid = numeric_density.cdf(grid[-1]) - numeric_density.cdf(grid[0])
    assert total == pytest.approx(on_grid, abs=1e-4)
    assert numeric == "gaussian" or 1.0 - on_grid > 1e-4  # so the Student-t's check is not the Gaussian's


def test_a_student_t_learns_its_degrees_of_freedom_and_a_gaussian_has_none():
    gaussian, _, _ = mixed_model("gaussian")
    assert gaussian.log_df is None and gaussian.numeric_df() is None
    assert all("df" not in v.name for v in gaussian.trainable_variables)
    likelihood, params, _ = mixed_model("student_t")
    assert likelihood.log_df in likelihood.trainable_variables
    np.testing.assert_allclose(likelihood.numeric_df().numpy(), [3.0], rtol=1e-6)
    x = tf.constant([[35.0, 1.0, 4.0, 2.0]])  # 14 / (0.7 x 4.08) = 4.9 scales off the decoder's loc
    with tf.GradientTape() as tape:
        log_prob = likelihood.distribution(params).log_prob(x)
    (grad,) = tape.gradient(log_prob, [likelihood.log_df])
    # an outlying value makes heavier tails (lower df) more likely
    assert grad is not None and float(grad.numpy()[0]) < 0


def test_numeric_likelihood_needs_a_feature_schema():
    from streamvi.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.numeric_likelihood"):
        load_settings(overrides=["model.numeric_likelihood=student_t"], environ={})
    settings = load_settings(
        overrides=["input.features=[{name: a}]", "model.numeric_likelihood=student_t"], environ={}
    )
    trainer = build_trainer(settings)
    assert trainer.model.likelihood.log_df is not None
