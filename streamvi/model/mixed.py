"""Mixed-type observations under a feature schema: the encoder's input and the decoder's likelihood.

The model vector holds one raw value per feature, NaN where not observed. The likelihood is the
product over the observed features of a Gaussian or Student-t density (numeric, on the standardised
value), a Bernoulli mass (binary), a categorical mass (categorical, hashed) and a Poisson mass (count); a
masked feature contributes nothing, so the ELBO bounds log p(observed part). A standardised value
u = (x - m) / s has density p(u) / s in x, so the numeric term carries -log s: the bound is a
density of the raw values in nats, comparable with and without normalisation and across time.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf
from tensorflow_probability import distributions as tfd

from streamvi.features.normaliser import RunningMoments
from streamvi.features.schema import FeatureLayout
from streamvi.model.base import Likelihood

#: The Gaussian scale of a numeric feature is learned per feature as floor + exp(log_scale),
#: starting at 1 (one standard deviation of the standardised value); the floor bounds each
#: numeric dimension's log-density by -log(floor) - 0.919 nats in standardised units.
MIN_NUMERIC_SCALE = 1e-3
#: A Student-t's degrees of freedom are learned per feature as 1 + exp(log_df), starting at 5: at
#: least a Cauchy's tails, at most (df to infinity) the Gaussian's.
STUDENT_T_START_DF = 5.0


class FeatureInputs(tf.Module):
    """Raw model vectors to the encoder's input: standardised numerics, binaries, log(1 + counts),
    one-hot classes, all zero where not observed, followed by the observed mask itself."""

    def __init__(self, layout: FeatureLayout, normaliser: RunningMoments | None) -> None:
        super().__init__(name="feature_inputs")
        self.layout = layout
        self.normaliser = normaliser

    @property
    def width(self) -> int:
        return self.layout.encoder_width

    def location_scale(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The numeric features' (mean, scale) in force; (0, 1) without a normaliser."""
        count = len(self.layout.numeric)
        if self.normaliser is None:
            return tf.zeros([count]), tf.ones([count])
        return self.normaliser.location_scale()

    def ready(self) -> tf.Tensor:
        return tf.constant(True) if self.normaliser is None else self.normaliser.ready()

    def fold(self, x: tf.Tensor, rows: tf.Tensor) -> None:
        """Fold the numeric values of the rows where ``rows`` is true into the normaliser."""
        if self.normaliser is not None and self.layout.numeric:
            self.normaliser.fold(tf.gather(x, self.layout.numeric, axis=1), rows)

    def batch_sums(self, x: tf.Tensor, rows: tf.Tensor) -> list[tf.Tensor]:
        """The normaliser's additive sums of a batch (``RunningMoments.batch_sums``); [] without one."""
        if self.normaliser is None or not self.layout.numeric:
            return []
        return self.normaliser.batch_sums(tf.gather(x, self.layout.numeric, axis=1), rows)

    def fold_sums(self, sums: list[tf.Tensor]) -> None:
        """Fold summed ``batch_sums`` (of one or several workers' batches) into the normaliser."""
        if sums and self.normaliser is not None:
            self.normaliser.fold_sums(sums)

    def state(self) -> list[tf.Variable]:
        """The normaliser's variables; [] without one."""
        return [] if self.normaliser is None else self.normaliser.state()

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.cast(x, tf.float32)
        observed = ~tf.math.is_nan(x)
        filled = tf.where(observed, x, tf.zeros_like(x))
        mask = tf.cast(observed, tf.float32)
        layout, parts = self.layout, []
        if layout.numeric:
            loc, scale = self.location_scale()
            standard = (tf.gather(filled, layout.numeric, axis=1) - loc) / scale
            parts.append(standard * tf.gather(mask, layout.numeric, axis=1))
        if layout.binary:
            parts.append(tf.gather(filled, layout.binary, axis=1))
        if layout.count:
            parts.append(tf.math.log1p(tf.gather(filled, layout.count, axis=1)))
        for column, classes in layout.categorical:
            parts.append(
                tf.one_hot(tf.cast(filled[:, column], tf.int32), classes) * mask[:, column : column + 1]
            )
        parts.append(mask)
        return tf.concat(parts, axis=1)


class MixedObservation:
    """p(x|z) for one set of decoder outputs: ``log_prob`` over the observed features of raw x."""

    def __init__(self, params: tf.Tensor, likelihood: MixedLikelihood) -> None:
        self.params = tf.cast(params, tf.float32)
        self.likelihood = likelihood

    def _split(self) -> dict[str, Any]:
        layout, offset, parts = self.likelihood.layout, 0, {}
        for kind, width in (("numeric", len(layout.numeric)), ("binary", len(layout.binary))):
            parts[kind] = self.params[..., offset : offset + width]
            offset += width
        parts["count"] = self.params[..., offset : offset + len(layout.count)]
        offset += len(layout.count)
        logits = []
        for _, classes in layout.categorical:
            logits.append(self.params[..., offset : offset + classes])
            offset += classes
        parts["categorical"] = logits
        return parts

    def _terms(self, x: tf.Tensor) -> list[tuple[tf.Tensor, list[int]]]:
        """Each type's masked per-feature log-density [..., B, n] and its model-vector columns, in
        the decoder's type order (numeric, binary, count, then each categorical as one column)."""
        x = tf.cast(x, tf.float32)
        observed = ~tf.math.is_nan(x)
        filled = tf.where(observed, x, tf.zeros_like(x))
        layout, parts = self.likelihood.layout, self._split()
        terms = []
        if layout.numeric:
            loc, scale = self.likelihood.inputs.location_scale()
            standard = (tf.gather(filled, layout.numeric, axis=1) - loc) / scale
            density = self.likelihood.numeric_density(parts["numeric"]).log_prob(standard)
            density -= tf.math.log(scale)
            terms.append((density, layout.numeric))
        if layout.binary:
            values = tf.gather(filled, layout.binary, axis=1)
            terms.append((tfd.Bernoulli(logits=parts["binary"]).log_prob(values), layout.binary))
        if layout.count:
            values = tf.gather(filled, layout.count, axis=1)
            terms.append((tfd.Poisson(log_rate=parts["count"]).log_prob(values), layout.count))
        masked = []
        for density, columns in terms:
            kept = tf.gather(observed, columns, axis=1)
            masked.append((tf.where(kept, density, tf.zeros_like(density)), columns))
        for (column, classes), logits in zip(layout.categorical, parts["categorical"], strict=True):
            hot = tf.one_hot(tf.cast(filled[:, column], tf.int32), classes)
            mass = tf.reduce_sum(hot * tf.nn.log_softmax(logits), axis=-1)
            masked.append((tf.where(observed[:, column], mass, tf.zeros_like(mass))[..., None], [column]))
        return masked

    def log_prob_parts(self, x: tf.Tensor) -> tf.Tensor:
        """log p(x_f | z) of each feature f in schema order, [..., B, F]; a masked feature is 0."""
        terms = self._terms(x)
        columns = [column for _, group in terms for column in group]
        stacked = tf.concat([density for density, _ in terms], axis=-1)
        order = [columns.index(j) for j in range(self.likelihood.layout.dim)]
        return tf.gather(stacked, order, axis=-1)

    def log_prob(self, x: tf.Tensor) -> tf.Tensor:
        """log p(observed x | z) in nats, shape [..., B]; masked (NaN) features add nothing.

        The sum of ``log_prob_parts``, accumulated type by type as it always was (bit-for-bit).
        """
        total = tf.zeros(tf.shape(self.params)[:-1])
        for density, _ in self._terms(x):
            total += tf.reduce_sum(density, axis=-1)
        return total

    def mean(self) -> tf.Tensor:
        """The expected raw value of each feature (a categorical's most probable class), [..., B, D]."""
        layout, parts = self.likelihood.layout, self._split()
        shape = tf.concat([tf.shape(self.params)[:-1], [layout.dim]], axis=0)
        columns: list[int] = []
        values = []
        if layout.numeric:
            loc, scale = self.likelihood.inputs.location_scale()
            columns += layout.numeric
            values.append(parts["numeric"] * scale + loc)
        columns += layout.binary + layout.count
        values += [tf.sigmoid(parts["binary"]), tf.exp(parts["count"])]
        for (column, _), logits in zip(layout.categorical, parts["categorical"], strict=True):
            columns.append(column)
            values.append(tf.cast(tf.argmax(logits, axis=-1), tf.float32)[..., None])
        stacked = tf.concat(values, axis=-1)
        order = [columns.index(j) for j in range(layout.dim)]
        return tf.reshape(tf.gather(stacked, order, axis=-1), shape)


class MixedLikelihood(Likelihood):
    """The product likelihood of a feature schema (see the module docstring)."""

    name = "mixed"

    def __init__(self, layout: FeatureLayout, inputs: FeatureInputs, numeric: str = "gaussian") -> None:
        super().__init__(layout.dim)
        if numeric not in ("gaussian", "student_t"):
            raise ValueError(f"unknown numeric likelihood {numeric!r} (gaussian or student_t)")
        self.layout = layout
        self.inputs = inputs
        self.numeric = numeric
        self.log_scale = tf.Variable(
            tf.fill([len(layout.numeric)], math.log(1.0 - MIN_NUMERIC_SCALE)), name="log_numeric_scale"
        )
        #: Only a Student-t has them (a Gaussian model's checkpoint holds no such variable).
        self.log_df = (
            tf.Variable(
                tf.fill([len(layout.numeric)], math.log(STUDENT_T_START_DF - 1.0)), name="log_numeric_df"
            )
            if numeric == "student_t"
            else None
        )

    def numeric_scale(self) -> tf.Tensor:
        """The learned scale of each numeric feature's density, in standardised units."""
        return MIN_NUMERIC_SCALE + tf.exp(self.log_scale)

    def numeric_df(self) -> tf.Tensor | None:
        """The learned degrees of freedom of each numeric feature's Student-t (None: Gaussian)."""
        return None if self.log_df is None else 1.0 + tf.exp(self.log_df)

    def numeric_density(self, loc: tf.Tensor) -> tfd.Distribution:
        """Each numeric feature's density of its standardised value, around the decoder's ``loc``."""
        df = self.numeric_df()
        if df is None:
            return tfd.Normal(loc, self.numeric_scale())
        return tfd.StudentT(df, loc, self.numeric_scale())

    @property
    def param_size(self) -> int:
        return self.layout.param_size

    def distribution(self, params: tf.Tensor) -> Any:
        return MixedObservation(params, self)
