"""Online normalisation of numeric features: running mean and variance of the records trained on.

Per feature, the count of observed values, their mean and the sum of squared deviations (M2) are
kept in float64 variables and folded batch by batch with the pairwise update of Chan, Golub and
LeVeque (1979): for a batch of n_b values with mean m_b and M2_b, delta = m_b - m,
m += delta n_b / n, M2 += M2_b + delta^2 n_a n_b / n (n = n_a + n_b). It equals the two-pass
mean and variance of every value folded so far (tests/unit/test_normaliser.py checks it).

Values are standardised with the moments folded so far from the first fold on: a column is centred
once it has a value and scaled once its values vary. Until ``warmup`` records have been folded the
normaliser is not *ready* and the trainer leaves the model's parameters alone, so the model only
learns on moments of at least ``warmup`` records; the warm-up's records are still scored on
standardised values, so their bounds are of the untrained model's order, not of the raw units'
(a raw value of 1e3 would otherwise give a bound near -5e5 nats, which then dominates any ranking
or reference of scores). The variables are part of the model: snapshots save and restore them, and the
SavedModel export carries them, so a served encoder takes raw values.
"""

from __future__ import annotations

import tensorflow as tf


class RunningMoments(tf.Module):
    """Running mean and variance of ``dim`` columns that may hold NaN (not observed)."""

    def __init__(self, dim: int, warmup: int) -> None:
        super().__init__(name="normaliser")
        if warmup < 1:
            raise ValueError("the normaliser's warm-up must be at least one record")
        self.dim = dim
        self.warmup = warmup
        self.records = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="records")
        self.count = tf.Variable(tf.zeros([dim], tf.float64), trainable=False, name="count")
        self.mean = tf.Variable(tf.zeros([dim], tf.float64), trainable=False, name="mean")
        self.m2 = tf.Variable(tf.zeros([dim], tf.float64), trainable=False, name="m2")

    def ready(self) -> tf.Tensor:
        """True once ``warmup`` records have been folded in."""
        return self.records >= self.warmup

    def variance(self) -> tf.Tensor:
        """The population variance of each column's observed values so far (0 before two)."""
        return tf.where(self.count > 1, self.m2 / tf.maximum(self.count, 1.0), tf.zeros_like(self.m2))

    def location_scale(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The (mean, standard deviation) in force, float32 [dim]: the mean once a column has a value
        (0 before), the standard deviation once its values vary (1 before)."""
        variance = self.variance()
        loc = tf.where(self.count > 0, self.mean, tf.zeros_like(self.mean))
        scale = tf.where(variance > 0, tf.sqrt(variance), tf.ones_like(variance))
        return tf.cast(loc, tf.float32), tf.cast(scale, tf.float32)

    def fold(self, values: tf.Tensor, rows: tf.Tensor) -> None:
        """Fold the rows of ``values`` [B, dim] where ``rows`` is true; NaN values are skipped."""
        self.fold_sums(self.batch_sums(values, rows))

    def batch_sums(self, values: tf.Tensor, rows: tf.Tensor) -> list[tf.Tensor]:
        """A batch's part of the next fold, as sums that add across batches folded at once (the
        workers' batches of one distributed step): [records, n, n d, M2, n d^2], float64, per column
        (records a scalar), with n the observed values, M2 their squared deviations from the
        batch's own mean (two-pass) and d that mean minus the running mean."""
        values = tf.cast(values, tf.float64)
        observed = tf.logical_and(~tf.math.is_nan(values), rows[:, None])
        zeros = tf.zeros_like(values)
        n_b = tf.reduce_sum(tf.cast(observed, tf.float64), axis=0)
        mean_b = tf.reduce_sum(tf.where(observed, values, zeros), axis=0) / tf.maximum(n_b, 1.0)
        m2_b = tf.reduce_sum(tf.where(observed, tf.square(values - mean_b), zeros), axis=0)
        offset = tf.where(n_b > 0, mean_b - self.mean, tf.zeros_like(n_b))
        records = tf.reduce_sum(tf.cast(rows, tf.float64))
        return [records, n_b, n_b * offset, m2_b, n_b * tf.square(offset)]

    def fold_sums(self, sums: list[tf.Tensor]) -> None:
        """Fold the summed ``batch_sums`` of one or more batches taken against the current mean.

        The union of K batches has n = sum n_k, mean offset delta = sum n_k d_k / n and
        M2 = sum M2_k + sum n_k d_k^2 - n delta^2 (Chan et al.'s combination, shifted by the running
        mean); it is then folded into the running moments as a single batch."""
        records, n_b, n_offset, m2_within, n_offset2 = sums
        delta = n_offset / tf.maximum(n_b, 1.0)
        m2_b = m2_within + tf.maximum(n_offset2 - delta * n_offset, 0.0)
        n_a = self.count.read_value()
        n = n_a + n_b
        share = tf.where(n > 0, n_b / tf.maximum(n, 1.0), tf.zeros_like(n))
        self.m2.assign_add(m2_b + tf.square(delta) * n_a * share)
        self.mean.assign_add(delta * share)
        self.count.assign(n)
        self.records.assign_add(tf.cast(tf.round(records), tf.int64))

    def state(self) -> list[tf.Variable]:
        """The variables that define the running moments (equal on every distributed worker)."""
        return [self.records, self.count, self.mean, self.m2]
