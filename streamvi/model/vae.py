"""The variational autoencoder: amortised encoder q(z|x), decoder p(x|z), prior p(z)."""

from __future__ import annotations

import tensorflow as tf
from tensorflow_probability import distributions as tfd

from streamvi.config import ModelSettings, TrainingSettings
from streamvi.errors import ConfigError
from streamvi.model.base import LatentFamily, Likelihood
from streamvi.model.latents import DiagonalGaussian
from streamvi.model.likelihoods import BernoulliLikelihood, GaussianLikelihood
from streamvi.model.networks import mlp


class VAE(tf.Module):
    """Encoder and decoder networks joined to a latent family and a likelihood."""

    def __init__(
        self,
        input_dim: int,
        latent: LatentFamily,
        likelihood: Likelihood,
        encoder_hidden: list[int],
        decoder_hidden: list[int],
        activation: str = "relu",
        dtype_policy: str = "float32",
        seed: int = 0,
    ) -> None:
        super().__init__(name="vae")
        self.input_dim = input_dim
        self.latent = latent
        self.likelihood = likelihood
        self.encoder = mlp(
            input_dim, encoder_hidden, latent.param_size, activation, dtype_policy, "encoder", seed
        )
        self.decoder = mlp(
            latent.latent_dim,
            decoder_hidden,
            likelihood.param_size,
            activation,
            dtype_policy,
            "decoder",
            seed + 1000,
        )

    @property
    def latent_dim(self) -> int:
        return self.latent.latent_dim

    def posterior(self, x: tf.Tensor) -> tfd.Distribution:
        """q(z|x) for a batch of inputs [B, input_dim]."""
        return self.latent.posterior(self.encoder(x))

    def prior(self, batch_shape: tf.Tensor) -> tfd.Distribution:
        """p(z) broadcast to ``batch_shape``."""
        return self.latent.prior(batch_shape)

    def observation(self, z: tf.Tensor) -> tfd.Distribution:
        """p(x|z) for latents of shape [..., latent_dim]; the decoder is applied to the flattened batch."""
        leading = tf.shape(z)[:-1]
        flat = tf.reshape(z, [-1, self.latent_dim])
        params = self.decoder(flat)
        params = tf.reshape(params, tf.concat([leading, [self.likelihood.param_size]], axis=0))
        return self.likelihood.distribution(params)


def build_latent(settings: ModelSettings) -> LatentFamily:
    return DiagonalGaussian(settings.latent_dim, settings.min_posterior_scale)


def build_likelihood(settings: ModelSettings, input_dim: int) -> Likelihood:
    if settings.likelihood == "bernoulli":
        return BernoulliLikelihood(input_dim)
    if settings.likelihood == "gaussian":
        return GaussianLikelihood(input_dim, settings.observation_scale)
    raise ConfigError(f"model.likelihood: unsupported value {settings.likelihood!r}")


def build_vae(model: ModelSettings, training: TrainingSettings, input_dim: int) -> VAE:
    """The VAE described by the model settings, under the training dtype policy."""
    policy = "float32" if training.mixed_precision == "off" else training.mixed_precision
    return VAE(
        input_dim=input_dim,
        latent=build_latent(model),
        likelihood=build_likelihood(model, input_dim),
        encoder_hidden=list(model.encoder_hidden),
        decoder_hidden=model.decoder_widths,
        activation=model.activation,
        dtype_policy=policy,
        seed=training.seed,
    )
