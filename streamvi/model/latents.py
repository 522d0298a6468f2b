"""Latent families: the diagonal Gaussian and Gumbel-softmax (Concrete) relaxed categoricals."""

from __future__ import annotations

import math

import tensorflow as tf
from tensorflow_probability import distributions as tfd

from streamvi.model.base import LatentFamily, LatentSample


class DiagonalGaussian(LatentFamily):
    """q(z|x) = N(mu(x), diag(sigma(x)^2)), p(z) = N(0, I); fully reparameterised (z = mu + sigma eps)."""

    name = "gaussian"

    def __init__(self, latent_dim: int, min_scale: float = 1e-4) -> None:
        super().__init__(name="gaussian_latent")
        self.latent_dim = latent_dim
        self.min_scale = min_scale

    @property
    def param_size(self) -> int:
        return 2 * self.latent_dim

    @property
    def latent_size(self) -> int:
        return self.latent_dim

    @property
    def summary_size(self) -> int:
        return self.latent_dim

    def _q(self, params: tf.Tensor) -> tfd.Distribution:
        loc, raw_scale = tf.split(tf.cast(params, tf.float32), 2, axis=-1)
        return tfd.MultivariateNormalDiag(loc=loc, scale_diag=tf.nn.softplus(raw_scale) + self.min_scale)

    def _prior(self, like: tf.Tensor) -> tfd.Distribution:
        return tfd.MultivariateNormalDiag(loc=tf.zeros_like(like), scale_diag=tf.ones_like(like))

    def sample(
        self, params: tf.Tensor, samples: int, seed: tf.Tensor, step: tf.Tensor, reparameterized: bool = True
    ) -> LatentSample:
        q = self._q(params)
        z = q.sample(samples, seed=seed)
        if not reparameterized:
            z = tf.stop_gradient(z)
        stopped = self._q(tf.stop_gradient(params))
        log_q, log_prior = q.log_prob(z), self._prior(z).log_prob(z)
        return LatentSample(z, log_q, stopped.log_prob(z), log_prior, log_q, log_prior)

    def analytic_kl(self, params: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        q = self._q(params)
        return q.kl_divergence(self._prior(q.mean()))

    def summary(self, params: tf.Tensor, step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        q = self._q(params)
        return q.mean(), q.stddev()


class GumbelSoftmax(LatentFamily):
    """M categorical latents with K classes each, relaxed to Gumbel-softmax (Concrete) samples.

    The model is the discrete one: z is M one-hot vectors, q(z|x) a product of categoricals and
    p(z) uniform. Reparameterised draws relax it: y = softmax((logits + g) / tau) with Gumbel noise
    g, at a temperature tau(step) = max(floor, start * exp(-rate * step)); their densities are the
    relaxed (Concrete) ones, evaluated in log space (ExpRelaxedOneHotCategorical) for stability, with
    the prior relaxed at the same temperature. Relaxed draws serve the training gradient only; they
    are not draws of the model, so they carry no exact densities. With ``straight_through`` the
    decoder sees the hard one-hot argmax of the relaxed draw, which is an exact categorical draw
    (the Gumbel-max trick), while gradients flow through the soft sample; its categorical
    densities are exact. Without reparameterisation (score function) the draws are exact one-hot
    categorical samples.
    """

    name = "gumbel_softmax"

    def __init__(
        self,
        variables: int,
        classes: int,
        temperature_start: float = 1.0,
        temperature_floor: float = 0.5,
        temperature_rate: float = 1e-4,
        straight_through: bool = False,
    ) -> None:
        super().__init__(name="gumbel_softmax_latent")
        self.count = variables
        self.classes = classes
        self.temperature_start = temperature_start
        self.temperature_floor = temperature_floor
        self.temperature_rate = temperature_rate
        self.straight_through = straight_through

    @property
    def param_size(self) -> int:
        return self.count * self.classes

    @property
    def latent_size(self) -> int:
        return self.count * self.classes

    @property
    def summary_size(self) -> int:
        return self.count * self.classes

    def temperature(self, step: tf.Tensor) -> tf.Tensor:
        """The annealed temperature at an optimiser step (computed in-graph, no host round-trip)."""
        decayed = self.temperature_start * tf.exp(-self.temperature_rate * tf.cast(step, tf.float32))
        return tf.maximum(tf.constant(self.temperature_floor, tf.float32), decayed)

    def _logits(self, params: tf.Tensor) -> tf.Tensor:
        shape = tf.concat([tf.shape(params)[:-1], [self.count, self.classes]], axis=0)
        return tf.reshape(tf.cast(params, tf.float32), shape)

    def _flatten_classes(self, z: tf.Tensor) -> tf.Tensor:
        return tf.reshape(z, tf.concat([tf.shape(z)[:-2], [self.latent_size]], axis=0))

    def sample(
        self, params: tf.Tensor, samples: int, seed: tf.Tensor, step: tf.Tensor, reparameterized: bool = True
    ) -> LatentSample:
        logits = self._logits(params)
        if not reparameterized:
            q = tfd.OneHotCategorical(logits=logits, dtype=tf.float32)
            z = tf.stop_gradient(q.sample(samples, seed=seed))  # [S, B, M, K]
            log_q = tf.reduce_sum(q.log_prob(z), axis=-1)
            stopped = tfd.OneHotCategorical(logits=tf.stop_gradient(logits), dtype=tf.float32)
            log_prior = self._uniform_log_prior(log_q)
            return LatentSample(
                self._flatten_classes(z),
                log_q,
                tf.reduce_sum(stopped.log_prob(z), axis=-1),
                log_prior,
                log_q,
                log_prior,
            )
        tau = self.temperature(step)
        q = tfd.ExpRelaxedOneHotCategorical(tau, logits=logits)
        log_y = q.sample(samples, seed=seed)  # [S, B, M, K], log of a point on the simplex
        stopped = tfd.ExpRelaxedOneHotCategorical(tau, logits=tf.stop_gradient(logits))
        prior = tfd.ExpRelaxedOneHotCategorical(tau, logits=tf.zeros_like(logits))
        soft = tf.exp(log_y)
        z = soft
        exact_log_q = exact_log_prior = None
        if self.straight_through:
            # argmax of the relaxed draw is argmax(logits + g): an exact categorical draw
            hard = tf.one_hot(tf.argmax(log_y, axis=-1), self.classes, dtype=soft.dtype)
            z = soft + tf.stop_gradient(hard - soft)
            categorical = tfd.OneHotCategorical(logits=logits, dtype=tf.float32)
            exact_log_q = tf.reduce_sum(categorical.log_prob(hard), axis=-1)
            exact_log_prior = self._uniform_log_prior(exact_log_q)
        return LatentSample(
            self._flatten_classes(z),
            tf.reduce_sum(q.log_prob(log_y), axis=-1),
            tf.reduce_sum(stopped.log_prob(log_y), axis=-1),
            tf.reduce_sum(prior.log_prob(log_y), axis=-1),
            exact_log_q,
            exact_log_prior,
        )

    def _uniform_log_prior(self, like: tf.Tensor) -> tf.Tensor:
        """log p(z) of the uniform prior over the K^M one-hot configurations, shaped like ``like``."""
        return tf.fill(tf.shape(like), tf.constant(-self.count * math.log(self.classes), like.dtype))

    def analytic_kl(self, params: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        """KL of the underlying categoricals to the uniform prior: sum p (log p + log K)."""
        log_p = tf.nn.log_softmax(self._logits(params), axis=-1)
        return tf.reduce_sum(tf.exp(log_p) * (log_p + math.log(self.classes)), axis=[-2, -1])

    def summary(self, params: tf.Tensor, step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Class probabilities (the mean of the one-hot z) and their standard deviations."""
        probs = self._flatten_classes(tf.nn.softmax(self._logits(params), axis=-1))
        return probs, tf.sqrt(probs * (1.0 - probs))
