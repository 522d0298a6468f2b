from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from streamvi.config import load_settings
from streamvi.runtime import build_trainer


def make(*overrides: str, dim: int = 6):
    settings = load_settings(
        overrides=[
            f"input.dim={dim}",
            "model.latent_dim=2",
            "model.encoder_hidden=[16]",
            "training.batch_size=8",
            *overrides,
        ],
        environ={},
    )
    return build_trainer(settings)


def data(n: int, dim: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, dim)) < 0.3).astype(np.float32)


def variables(trainer) -> list[np.ndarray]:
    return [v.numpy().copy() for v in trainer.model.trainable_variables]


def test_step_reports_prequential_scores_and_counts_steps():
    trainer = make()
    x = data(8)
    before = trainer.evaluate(x)
    result = trainer.train(x.copy(), 8)
    assert result.step == 1 == trainer.step
    assert result.scores.size == 8
    assert result.scores.z_loc.shape == (8, 2) and result.scores.z_scale.shape == (8, 2)
    assert np.all(result.scores.z_scale > 0)
    np.testing.assert_allclose(
        result.scores.bound, result.scores.reconstruction - result.scores.kl, rtol=1e-5, atol=1e-5
    )
    # Scored before the update: the KL term (analytic) equals a no-update evaluation's exactly.
    np.testing.assert_allclose(result.scores.kl, before.kl, rtol=1e-5)
    after = trainer.evaluate(x)
    assert not np.allclose(after.kl, before.kl)


def test_padding_rows_do_not_influence_the_update():
    x = data(8)
    clean, dirty = x.copy(), x.copy()
    clean[5:] = 0.0
    dirty[5:] = 1e6  # garbage past the real records
    first, second = make(), make()
    r1, r2 = first.train(clean, 5), second.train(dirty, 5)
    assert r1.scores.size == r2.scores.size == 5
    for a, b in zip(variables(first), variables(second), strict=True):
        np.testing.assert_array_equal(a, b)
    assert r1.loss == pytest.approx(r2.loss)


def test_training_improves_the_bound_on_structured_data():
    trainer = make("training.learning_rate=0.01")
    rng = np.random.default_rng(1)
    prototypes = (rng.random((2, 6)) < 0.5).astype(np.float32)
    x = prototypes[rng.integers(0, 2, size=800)]
    start = trainer.evaluate(x).bound.mean()
    for i in range(0, 800, 8):
        trainer.train(x[i : i + 8].copy(), 8)
    end = trainer.evaluate(x).bound.mean()
    # Two equally likely binary prototypes: log p(x) = log(1/2) is the best any model can reach,
    # an untrained decoder scores about 6 log(1/2). Require at least half of that gap closed.
    best = np.log(0.5)
    assert start < 4 * best
    assert end > (start + best) / 2


def test_wrong_shapes_are_rejected():
    trainer = make()
    with pytest.raises(ValueError, match="shape"):
        trainer.train(np.zeros((4, 6), np.float32), 4)
    with pytest.raises(ValueError, match="real records"):
        trainer.train(np.zeros((8, 6), np.float32), 0)


def test_mixed_precision_policy_trains_with_float32_outputs():
    trainer = make("training.mixed_precision=mixed_float16", "training.jit_compile=false")
    assert trainer.model.encoder.layers[0].compute_dtype == "float16"
    result = trainer.train(data(8), 8)
    assert result.scores.bound.dtype == np.float32
    assert np.isfinite(result.scores.bound).all() and np.isfinite(result.loss)


@pytest.mark.parametrize("jit", ["true", "false"])
@pytest.mark.parametrize(
    ("policy", "unit_roundoff"), [("mixed_float16", 2.0**-11), ("mixed_bfloat16", 2.0**-8)]
)
def test_mixed_precision_bound_is_the_float32_bound_up_to_rounding(policy, unit_roundoff, jit):
    """Same weights, same noise: the reduced-precision hidden layers (one in the encoder, one in the
    decoder) each round their inputs, weights and outputs (relative error <= u each), so to first
    order a record's bound moves by at most ~6u of the magnitude of its terms (|bound| = |log p| + KL
    for a Bernoulli VAE); 8u leaves room for the rounding inside the matrix products. z_loc comes
    from a float32 layer on the rounded hidden units: the same bound relative to its magnitude,
    floored at 1, the prior's scale."""
    full = make(f"training.jit_compile={jit}")
    mixed = make(f"training.mixed_precision={policy}", f"training.jit_compile={jit}")
    assert mixed.model.encoder.layers[0].compute_dtype == policy.removeprefix("mixed_")
    for target, source in zip(mixed.model.trainable_variables, full.model.trainable_variables, strict=True):
        target.assign(source)
    x = data(64)
    expected, got = full.evaluate(x), mixed.evaluate(x)
    difference = np.abs(got.bound - expected.bound)
    assert difference.max() > 0  # the policy really computes in reduced precision
    np.testing.assert_array_less(difference, 8 * unit_roundoff * np.abs(expected.bound))
    np.testing.assert_array_less(
        np.abs(got.z_loc - expected.z_loc), 8 * unit_roundoff * (np.abs(expected.z_loc) + 1.0)
    )


def test_step_is_compiled_once_for_partial_batches():
    trainer = make()
    x = data(8)
    for n in (8, 3, 1, 7):
        trainer.train(x.copy(), n)
    assert trainer._train_fn.experimental_get_tracing_count() == 1


def test_device_setting_places_variables():
    trainer = make("training.device=/CPU:0")
    assert "CPU:0" in trainer.model.trainable_variables[0].device
    assert np.isfinite(trainer.train(data(8), 8).loss)


def test_rng_state_drives_sampling():
    a, b = make(), make()
    x = data(8)
    np.testing.assert_array_equal(a.train(x.copy(), 8).scores.bound, b.train(x.copy(), 8).scores.bound)
    b.rng.reset_from_seed(99)
    assert not np.array_equal(a.train(x.copy(), 8).scores.bound, b.train(x.copy(), 8).scores.bound)
    assert isinstance(a.rng, tf.random.Generator)


@pytest.mark.parametrize("trained_before", [0, 1])
def test_warm_up_compiles_the_step_and_changes_nothing(trained_before):
    """The warm-up step on an all-padding batch leaves weights, optimizer, step and RNG as they were,
    so a warmed-up trainer gives bit-identical results to a cold one, without tracing again."""
    x = data(8)
    cold, warm = make(), make()
    for _ in range(trained_before):  # then both optimizers hold state, so a stray update would show
        cold.train(x, 8)
        warm.train(x, 8)
    before = [v.numpy().copy() for v in warm.optimizer.variables]
    weights = variables(warm)
    rng = warm.rng.state.numpy().copy()
    assert warm.warm_up() > 0.0
    assert warm.step == trained_before
    assert np.array_equal(warm.rng.state.numpy(), rng)
    assert all(np.array_equal(a, b) for a, b in zip(weights, variables(warm), strict=True))
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, warm.optimizer.variables, strict=True))
    for _ in range(3):
        a, b = cold.train(x, 8), warm.train(x, 8)
        assert a.step == b.step and a.loss == b.loss
        assert np.array_equal(a.scores.bound, b.scores.bound)
    assert warm._train_fn.experimental_get_tracing_count() == 1


def test_step_counts_beyond_float32_precision_come_back_exact():
    """The step count rides in the step's single float32 output as two 24-bit halves."""
    trainer = make()
    start = 2**24 + 2**30 + 1  # not representable in float32
    trainer.step_counter.assign(start)
    assert trainer.train(data(8), 8).step == start + 1 == trainer.step


def test_a_batch_that_trains_nothing_is_scored_as_evaluate_scores_it():
    """``train_rows`` with no trainable row gives evaluate's scores bit for bit (same draws), the
    trainer's step, and no update; the warm-up compiles it and draws as ``evaluate`` does."""
    x = data(8)
    scored, evaluated = make(), make()
    for trainer in (scored, evaluated):
        trainer.step_counter.assign(2**24 + 5)
    weights = variables(scored)
    scored.warm_up_scoring()
    evaluated.evaluate(np.zeros((1, 6), np.float32))
    assert np.array_equal(scored.rng.state.numpy(), evaluated.rng.state.numpy())
    rows = np.zeros((8, scored.row_width), np.float32)
    rows[:5, :6] = x[:5]
    for _ in range(2):
        result, expected = scored.train_rows(rows, 5), evaluated.evaluate(x[:5])
        assert result.step == 2**24 + 5 and not result.trained
        for name in ("bound", "z_loc", "z_scale"):
            assert np.array_equal(getattr(result.scores, name), getattr(expected, name))
    assert all(np.array_equal(a, b) for a, b in zip(weights, variables(scored), strict=True))
    assert scored._score_fn.experimental_get_tracing_count() == 1
