"""Observation likelihoods p(x|z): Bernoulli for data in [0, 1], Gaussian with a fixed scale."""

from __future__ import annotations

import tensorflow as tf
from tensorflow_probability import distributions as tfd

from streamvi.model.base import Likelihood


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli per dimension; for x in [0, 1] this is the binary cross-entropy."""

    name = "bernoulli"

    @property
    def param_size(self) -> int:
        return self.dim

    def distribution(self, params: tf.Tensor) -> tfd.Distribution:
        return tfd.Independent(tfd.Bernoulli(logits=tf.cast(params, tf.float32), dtype=tf.float32), 1)


class GaussianLikelihood(Likelihood):
    """Independent Gaussian per dimension with a fixed observation scale."""

    name = "gaussian"

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__(dim)
        self.scale = scale

    @property
    def param_size(self) -> int:
        return self.dim

    def distribution(self, params: tf.Tensor) -> tfd.Distribution:
        loc = tf.cast(params, tf.float32)
        return tfd.Independent(tfd.Normal(loc=loc, scale=tf.fill(tf.shape(loc), self.scale)), 1)
