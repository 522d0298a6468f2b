"""The estimators as the Trainer runs them: masking, the baseline's running state, clipping, bias.

Known answers come from the closed-form linear-Gaussian model (tests/unit/linear_gaussian.py) or
from the update rules themselves; Monte Carlo checks allow Z = 4.4 standard errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from streamvi.config import load_settings
from streamvi.estimators import (
    ImportanceWeighted,
    ScoreFunction,
    SGVBAnalyticKL,
    SGVBMonteCarlo,
    StickingTheLanding,
)
from streamvi.runtime import build_trainer
from streamvi.training.trainer import Trainer
from tests.unit.linear_gaussian import LinearGaussian

Z = 4.4
#: A finite float32 whose Gaussian log-density overflows to -inf: one record's infinite term.
HUGE = 1e30


def make(*overrides: str, dim: int = 4, batch: int = 8) -> Trainer:
    settings = load_settings(
        overrides=[
            f"input.dim={dim}",
            "model.latent_dim=2",
            "model.encoder_hidden=[8]",
            "model.likelihood=gaussian",
            "model.observation_scale=0.5",
            f"training.batch_size={batch}",
            "training.clip_grad_norm=null",
            *overrides,
        ],
        environ={},
    )
    return build_trainer(settings)


def normal_rows(n: int, dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def values(variables) -> list[np.ndarray]:
    return [v.numpy().copy() for v in variables]


def test_running_mean_baseline_follows_its_update_rule_and_ignores_a_non_finite_batch():
    trainer = make("training.estimator=score_function", "training.baseline=running_mean")
    estimator = trainer.estimator
    assert isinstance(estimator, ScoreFunction)
    decay = estimator.decay
    total, weight = 0.0, 0.0
    weights = np.array([1, 1, 1, 0, 1, 1, 0, 1], np.float32)  # two held-out rows, never folded in
    for step in range(8):
        x = normal_rows(8, seed=step)
        poisoned = step == 4
        if poisoned:
            x[2] = HUGE  # a trained row whose log-likelihood is -inf: the update is skipped
        result = trainer.train(x, 8, weights=weights)
        assert result.applied is not poisoned
        if not poisoned:
            # for the score function the reported bound is the mean learning signal of the record
            batch_mean = float(np.sum(result.scores.bound * weights) / weights.sum())
            total, weight = decay * total + (1 - decay) * batch_mean, decay * weight + (1 - decay)
        else:
            assert not np.isfinite(result.scores.bound[2])
        np.testing.assert_allclose(float(estimator.running_mean()), total / weight, rtol=1e-4)
    assert np.isfinite(float(estimator.running_mean()))


@pytest.mark.parametrize("estimator", ["sgvb_b", "score_function"])
def test_a_held_out_row_with_an_infinite_term_leaves_the_update_unchanged(estimator):
    """A weight-0 row is selected out of the loss, not multiplied by 0 (0 x inf = NaN)."""
    x = normal_rows(8, seed=1)
    weights = np.ones(8, np.float32)
    weights[3] = 0.0
    benign, outlier = x.copy(), x.copy()
    outlier[3] = HUGE
    first, second = make(f"training.estimator={estimator}"), make(f"training.estimator={estimator}")
    r1 = first.train(benign, 8, weights=weights)
    r2 = second.train(outlier, 8, weights=weights)
    assert r1.applied and r2.applied and np.isfinite(r2.loss)
    assert not np.isfinite(r2.scores.bound[3])  # the outlier's own score says what it is
    np.testing.assert_allclose(r2.loss, r1.loss, rtol=1e-6)
    for a, b in zip(values(first.trainable_variables), values(second.trainable_variables), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_clipping_scales_the_model_gradient_only_and_is_reported():
    common = (
        "training.estimator=score_function",
        "training.baseline=learned",
        "training.optimizer=sgd",
        "training.learning_rate=0.1",
    )
    free, clipped = make(*common), make(*common, "training.clip_grad_norm=0.01")
    x = normal_rows(8, seed=2)
    start = values(free.trainable_variables)
    for a, b in zip(start, values(clipped.trainable_variables), strict=True):
        np.testing.assert_array_equal(a, b)  # the same seed builds the same model and baseline
    r_free, r_clipped = free.train(x, 8), clipped.train(x, 8)
    assert not r_free.clipped and r_clipped.clipped
    assert r_free.grad_norm == pytest.approx(r_clipped.grad_norm, rel=1e-6)  # the norm before clipping
    assert r_free.grad_norm > 0.01
    count = len(free.model.trainable_variables)
    delta_free = [a - s for a, s in zip(values(free.trainable_variables), start, strict=True)]
    delta_clipped = [a - s for a, s in zip(values(clipped.trainable_variables), start, strict=True)]
    model_norm = np.sqrt(sum(np.sum(d**2) for d in delta_free[:count])) / 0.1
    assert model_norm == pytest.approx(r_free.grad_norm, rel=1e-4)
    scale = 0.01 / r_free.grad_norm
    # a difference of two float32 parameters of size up to ~2 is exact to about 2 x 2 x 2^-24
    rounding = 4 * 2 * float(np.finfo(np.float32).eps) / 2
    for a, b in zip(delta_free[:count], delta_clipped[:count], strict=True):
        np.testing.assert_allclose(b, a * scale, rtol=1e-4, atol=rounding)
    # the learned baseline's own gradient is not the model's: it is never clipped with it
    for a, b in zip(delta_free[count:], delta_clipped[count:], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=rounding)
    assert any(np.abs(d).max() > 0 for d in delta_free[count:])


def linear_gaussian_trainer(lg: LinearGaussian, estimator, copies: int, x: np.ndarray) -> Trainer:
    model = lg.vae(exact_encoder=False, perturb=0.4)
    return Trainer(
        model,
        estimator,
        tf_keras.optimizers.SGD(learning_rate=1e-3),
        batch_size=copies * x.shape[0],
        seed=5,
    )


def exact_gradient(lg: LinearGaussian, trainer: Trainer, x: np.ndarray) -> np.ndarray:
    with tf.GradientTape() as tape:
        objective = tf.reduce_mean(lg.closed_form_elbo(trainer.model, tf.constant(x)))
    return np.concatenate([g.numpy().ravel() for g in tape.gradient(objective, trainer.trainable_variables)])


@pytest.mark.slow
@pytest.mark.parametrize(
    "estimator",
    [
        SGVBMonteCarlo(),
        SGVBAnalyticKL(),
        StickingTheLanding(),
        ImportanceWeighted(1),
        ScoreFunction(baseline="none"),
    ],
    ids=lambda e: e.name,
)
def test_the_trainers_update_is_an_unbiased_step_along_the_elbo_gradient(estimator):
    """SGD from one state, repeated: the mean update / learning rate is the exact ELBO gradient."""
    lg = LinearGaussian.make(seed=7)
    x = lg.sample(5, seed=8)
    copies, repeats = 8, 400
    trainer = linear_gaussian_trainer(lg, estimator, copies, x)
    rows = np.tile(x, (copies, 1))
    exact = exact_gradient(lg, trainer, x)
    start = values(trainer.trainable_variables)
    estimates = []
    for _ in range(repeats):
        trainer.train(rows, rows.shape[0])
        after = values(trainer.trainable_variables)
        estimates.append(np.concatenate([(a - s).ravel() for a, s in zip(after, start, strict=True)]) / 1e-3)
        for variable, value in zip(trainer.trainable_variables, start, strict=True):
            variable.assign(value)
    grads = np.array(estimates)
    mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(repeats)
    # float32 updates of size lr x g carry rounding of ~1e-7 / lr relative to the parameter
    rounding = 1e-7 / 1e-3 * (1 + np.abs(np.concatenate([s.ravel() for s in start])))
    assert np.all(np.abs(mean - exact) <= Z * se + rounding), np.max(np.abs(mean - exact) - Z * se)
    assert np.abs(exact).max() > 0.1


@pytest.mark.slow
def test_a_fitted_learned_baseline_reduces_the_encoder_gradient_variance():
    lg = LinearGaussian.make(seed=16)
    x = lg.sample(5, seed=17)
    model = lg.vae(exact_encoder=False, perturb=0.4)
    learned = ScoreFunction(baseline="learned", input_width=lg.data_dim, hidden=16)
    copies = 16
    rows = np.tile(x, (copies, 1))
    # fit the baseline on the fixed model: freeze the model, train the baseline through the Trainer
    model.encoder.trainable = model.decoder.trainable = False
    fitter = Trainer(model, learned, tf_keras.optimizers.Adam(0.02), batch_size=rows.shape[0], seed=3)
    for _ in range(300):
        fitter.train(rows, rows.shape[0])
    model.encoder.trainable = model.decoder.trainable = True

    def encoder_gradients(estimator, n: int, seed: int) -> np.ndarray:
        tiled = tf.tile(tf.constant(x), [n, 1])
        with tf.GradientTape() as tape:
            terms = estimator.terms(
                model, tiled, tf.zeros([tiled.shape[0], 0]), tf.constant([seed, 0], tf.int32), tf.constant(0)
            )
            per_draw = tf.reduce_mean(tf.reshape(terms.surrogate, [n, -1]), axis=1)
        jac = tape.jacobian(per_draw, model.encoder.trainable_variables)
        return np.concatenate([j.numpy().reshape(n, -1) for j in jac], axis=1)

    n = 1500
    ratio = encoder_gradients(learned, n, 1).var(0) / encoder_gradients(
        ScoreFunction(baseline="none"), n, 2
    ).var(0)
    # each variance has a relative standard error of sqrt(2 / (n - 1)) for near-normal draws, so
    # their ratio about sqrt(4 / (n - 1)); the median must be below 1 by Z of those
    relative_se = np.sqrt(4 / (n - 1))
    assert np.median(ratio) < 1 - Z * relative_se, np.median(ratio)
