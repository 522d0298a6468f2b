"""Latent families: the diagonal Gaussian with a standard-normal prior."""

from __future__ import annotations

import tensorflow as tf
from tensorflow_probability import distributions as tfd

from streamvi.model.base import LatentFamily


class DiagonalGaussian(LatentFamily):
    """q(z|x) = N(mu(x), diag(sigma(x)^2)), p(z) = N(0, I); fully reparameterised."""

    name = "gaussian"

    def __init__(self, latent_dim: int, min_scale: float = 1e-4) -> None:
        super().__init__(latent_dim)
        self.min_scale = min_scale

    @property
    def param_size(self) -> int:
        return 2 * self.latent_dim

    def posterior(self, params: tf.Tensor) -> tfd.Distribution:
        loc, raw_scale = tf.split(tf.cast(params, tf.float32), 2, axis=-1)
        scale = tf.nn.softplus(raw_scale) + self.min_scale
        return tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)

    def prior(self, batch_shape: tf.Tensor) -> tfd.Distribution:
        shape = tf.concat([batch_shape, [self.latent_dim]], axis=0)
        return tfd.MultivariateNormalDiag(loc=tf.zeros(shape), scale_diag=tf.ones(shape))

    def summary(self, posterior: tfd.Distribution) -> tuple[tf.Tensor, tf.Tensor]:
        return posterior.mean(), posterior.stddev()
