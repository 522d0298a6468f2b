"""Observation likelihoods p(x|z): Bernoulli, Gaussian (fixed or learned scale), Poisson."""

from __future__ import annotations

import math

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
    """Independent Gaussian per dimension; the scale is fixed, or learned per dimension."""

    name = "gaussian"

    def __init__(self, dim: int, scale: float, learned: bool = False) -> None:
        super().__init__(dim)
        self.scale = scale
        self.learned = learned
        self.log_scale = (
            tf.Variable(tf.fill([dim], math.log(scale)), name="log_observation_scale") if learned else None
        )

    @property
    def param_size(self) -> int:
        return self.dim

    def distribution(self, params: tf.Tensor) -> tfd.Distribution:
        loc = tf.cast(params, tf.float32)
        if self.log_scale is not None:
            scale = tf.broadcast_to(tf.exp(self.log_scale), tf.shape(loc))
        else:
            scale = tf.fill(tf.shape(loc), self.scale)
        return tfd.Independent(tfd.Normal(loc=loc, scale=scale), 1)


class PoissonLikelihood(Likelihood):
    """Independent Poisson per dimension for count data; the decoder outputs log-rates."""

    name = "poisson"

    @property
    def param_size(self) -> int:
        return self.dim

    def distribution(self, params: tf.Tensor) -> tfd.Distribution:
        return tfd.Independent(tfd.Poisson(log_rate=tf.cast(params, tf.float32)), 1)
