"""The online normaliser's pairwise update equals the two-pass mean and variance of what it folded."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from streamvi.features.normaliser import RunningMoments


def test_batched_folds_equal_two_pass_moments_with_missing_values_and_unused_rows():
    rng = np.random.default_rng(3)
    scales = np.array([1e-3, 1.0, 1e3, 5.0])
    values = rng.normal(10.0, 1.0, size=(1000, 4)) * scales
    values[rng.random(values.shape) < 0.1] = np.nan  # not observed
    values[:, 3] = np.where(np.arange(1000) < 990, np.nan, values[:, 3])  # nearly always missing
    rows = rng.random(1000) < 0.8  # the others are held out: never folded
    moments = RunningMoments(4, warmup=10)
    fold = tf.function(moments.fold)
    for start in range(0, 1000, 64):
        fold(tf.constant(values[start : start + 64], tf.float32), tf.constant(rows[start : start + 64]))
    used = values.astype(np.float32).astype(np.float64)[rows]
    count = (~np.isnan(used)).sum(axis=0)
    np.testing.assert_array_equal(moments.count.numpy(), count)
    assert int(moments.records.numpy()) == rows.sum()
    # float64 accumulation: agreement to ~1e-12 relative, far inside any effect on float32 inputs
    np.testing.assert_allclose(moments.mean.numpy(), np.nanmean(used, axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.variance().numpy(), np.nanvar(used, axis=0), rtol=1e-9)


def test_values_are_standardised_with_the_moments_so_far_during_and_after_the_warm_up():
    moments = RunningMoments(2, warmup=5)
    loc, scale = moments.location_scale()
    assert loc.numpy().tolist() == [0, 0] and scale.numpy().tolist() == [1, 1]  # nothing folded yet
    batch = tf.constant([[1.0, 7.0], [3.0, 7.0], [5.0, 7.0]])
    moments.fold(batch, tf.constant([True, True, True]))
    loc, scale = moments.location_scale()
    assert not bool(moments.ready())
    np.testing.assert_allclose(loc.numpy(), [3.0, 7.0])  # a constant column is centred, not scaled
    np.testing.assert_allclose(scale.numpy(), [np.sqrt(np.var([1, 3, 5])), 1.0], rtol=1e-6)
    moments.fold(batch, tf.constant([True, True, False]))
    loc, scale = moments.location_scale()
    assert bool(moments.ready())
    np.testing.assert_allclose(loc.numpy(), [2.6, 7.0])
    np.testing.assert_allclose(scale.numpy(), [np.sqrt(np.var([1, 3, 5, 1, 3])), 1.0], rtol=1e-6)


def test_summed_batch_sums_of_several_batches_fold_as_their_union():
    """What distributed workers do: each batch's sums against the same running mean, added, then
    folded once, equal folding the concatenated batch (and the two-pass moments)."""
    rng = np.random.default_rng(11)
    values = rng.normal(3.0, 2.0, size=(300, 3)) * np.array([1e-3, 1.0, 1e3])
    values[rng.random(values.shape) < 0.2] = np.nan
    rows = rng.random(300) < 0.9
    values32 = tf.constant(values, tf.float32)
    union, parts = RunningMoments(3, warmup=1), RunningMoments(3, warmup=1)
    for start in range(0, 300, 60):  # a step: the union's 60 rows, or three workers' 20 each
        batch, used = values32[start : start + 60], tf.constant(rows[start : start + 60])
        union.fold(batch, used)
        sums = [parts.batch_sums(batch[k : k + 20], used[k : k + 20]) for k in (0, 20, 40)]
        parts.fold_sums([tf.add_n(list(column)) for column in zip(*sums, strict=True)])
    assert int(parts.records.numpy()) == int(union.records.numpy()) == rows.sum()
    np.testing.assert_array_equal(parts.count.numpy(), union.count.numpy())
    np.testing.assert_allclose(parts.mean.numpy(), union.mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(parts.m2.numpy(), union.m2.numpy(), rtol=1e-9)
    used64 = values.astype(np.float32).astype(np.float64)[rows]
    np.testing.assert_allclose(parts.variance().numpy(), np.nanvar(used64, axis=0), rtol=1e-9)
