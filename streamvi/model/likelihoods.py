"""Observation likelihoods p(x|z): Bernoulli, continuous Bernoulli, Gaussian, Poisson, binomial.

Each is a normalised density (or mass function) on its support, so log p(x|z) is in nats there:
Bernoulli on binary x, continuous Bernoulli on [0, 1], Gaussian on the real line, Poisson on the
non-negative integers, binomial on the integers 0..N. The record decoder rejects values outside the
configured likelihood's support.
"""

from __future__ import annotations

import math

import tensorflow as tf
from tensorflow_probability import distributions as tfd

from streamvi.model.base import Likelihood


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli per dimension: a probability mass for binary x. For x strictly between
    0 and 1 it is the binary cross-entropy, which is not a normalised density (the continuous
    Bernoulli is)."""

    name = "bernoulli"

    @property
    def param_size(self) -> int:
        return self.dim

    def distribution(self, params: tf.Tensor) -> tfd.Distribution:
        return tfd.Independent(tfd.Bernoulli(logits=tf.cast(params, tf.float32), dtype=tf.float32), 1)


class ContinuousBernoulliLikelihood(Likelihood):
    """Independent continuous Bernoulli per dimension (Loaiza-Ganem & Cunningham 2019): the
    Bernoulli form lambda^x (1 - lambda)^(1 - x) times its normalising constant, a true density on
    [0, 1], so grey-level data get a log-likelihood in nats."""

    name = "continuous_bernoulli"

    @property
    def param_size(self) -> int:
        return self.dim

    def distribution(self, params: tf.Tensor) -> tfd.Distribution:
        return tfd.Independent(tfd.ContinuousBernoulli(logits=tf.cast(params, tf.float32)), 1)


class GaussianLikelihood(Likelihood):
    """Independent Gaussian per dimension; the scale is fixed, or learned per dimension.

    A learned scale is ``min_scale + exp(log_scale)``: without a floor a dimension the data hold
    constant drives its scale to 0 and its log-density, hence the ELBO, to +infinity. The floor
    bounds each dimension's log-density by -log(min_scale) - log(2 pi) / 2.
    """

    name = "gaussian"

    def __init__(self, dim: int, scale: float, learned: bool = False, min_scale: float = 1e-3) -> None:
        super().__init__(dim)
        if learned and not scale > min_scale:
            raise ValueError(f"the initial scale {scale} must exceed the floor {min_scale}")
        self.scale = scale
        self.learned = learned
        self.min_scale = min_scale
        self.log_scale = (
            tf.Variable(tf.fill([dim], math.log(scale - min_scale)), name="log_observation_scale")
            if learned
            else None
        )

    def observation_scale(self) -> tf.Tensor:
        """The per-dimension scale in force, [dim]."""
        if self.log_scale is None:
            return tf.fill([self.dim], tf.constant(self.scale, tf.float32))
        return self.min_scale + tf.exp(self.log_scale)

    @property
    def param_size(self) -> int:
        return self.dim

    def distribution(self, params: tf.Tensor) -> tfd.Distribution:
        loc = tf.cast(params, tf.float32)
        if self.log_scale is not None:
            scale = tf.broadcast_to(self.observation_scale(), tf.shape(loc))
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


class BinomialLikelihood(Likelihood):
    """Independent Binomial(N, p) per dimension for counts out of a known total N (e.g. "on" pixels
    of a block); the decoder outputs the logits of p."""

    name = "binomial"

    def __init__(self, dim: int, total_count: int) -> None:
        super().__init__(dim)
        if total_count < 1:
            raise ValueError(f"the binomial total count must be at least 1, got {total_count}")
        self.total_count = total_count

    @property
    def param_size(self) -> int:
        return self.dim

    def distribution(self, params: tf.Tensor) -> tfd.Distribution:
        logits = tf.cast(params, tf.float32)
        return tfd.Independent(tfd.Binomial(total_count=float(self.total_count), logits=logits), 1)
