"""The variational autoencoder: amortised encoder q(z|x, c), decoder p(x|z, c), prior p(z).

The context ``c`` (a conditional VAE) has ``context_dim`` columns; with ``context_dim == 0`` it is
an empty [B, 0] tensor and the model is an ordinary VAE, so every code path has one signature.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow_probability import distributions as tfd

from streamvi.config import InputSettings, ModelSettings, TrainingSettings
from streamvi.errors import ConfigError
from streamvi.features.normaliser import RunningMoments
from streamvi.features.schema import FeatureLayout
from streamvi.model.base import LatentFamily, Likelihood
from streamvi.model.latents import DiagonalGaussian, GumbelSoftmax
from streamvi.model.likelihoods import (
    BernoulliLikelihood,
    BinomialLikelihood,
    ContinuousBernoulliLikelihood,
    GaussianLikelihood,
    PoissonLikelihood,
)
from streamvi.model.mixed import FeatureInputs, MixedLikelihood, MixedObservation
from streamvi.model.networks import mlp


class VAE(tf.Module):
    """Encoder and decoder networks joined to a latent family and a likelihood.

    Under a feature schema, ``inputs`` turns the raw model vector (NaN where not observed) into the
    encoder's input and keeps the online normaliser, whose state the trainer folds batches into.
    """

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
        context_dim: int = 0,
        inputs: FeatureInputs | None = None,
    ) -> None:
        super().__init__(name="vae")
        self.input_dim = input_dim
        self.context_dim = context_dim
        self.latent = latent
        self.likelihood = likelihood
        self.inputs = inputs
        self.encoder = mlp(
            (inputs.width if inputs is not None else input_dim) + context_dim,
            encoder_hidden,
            latent.param_size,
            activation,
            dtype_policy,
            "encoder",
            seed,
        )
        self.decoder = mlp(
            latent.latent_size + context_dim,
            decoder_hidden,
            likelihood.param_size,
            activation,
            dtype_policy,
            "decoder",
            seed + 1000,
        )

    @property
    def trainable_variables(self) -> tuple[tf.Variable, ...]:
        """Encoder, decoder and likelihood variables, in that order; honours Keras ``trainable`` flags."""
        return (
            tuple(self.encoder.trainable_variables)
            + tuple(self.decoder.trainable_variables)
            + tuple(self.likelihood.trainable_variables)
        )

    def encode(self, x: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
        """Encoder outputs (the parameters of q(z|x, c)) for x [B, D] and c [B, C]."""
        if self.inputs is not None:
            x = self.inputs(x)
        return self.encoder(tf.concat([x, c], axis=-1) if self.context_dim else x)

    def ready(self) -> tf.Tensor:
        """False while the online normaliser warms up: the trainer then leaves the parameters alone."""
        return tf.constant(True) if self.inputs is None else self.inputs.ready()

    def fold(self, x: tf.Tensor, rows: tf.Tensor) -> None:
        """Fold the rows of x where ``rows`` is true into the model's running input statistics."""
        if self.inputs is not None:
            self.inputs.fold(x, rows)

    def input_sums(self, x: tf.Tensor, rows: tf.Tensor) -> list[tf.Tensor]:
        """The rows' additive contribution to the running input statistics (summed over workers
        before ``fold_input_sums``); [] when the model keeps none."""
        return [] if self.inputs is None else self.inputs.batch_sums(x, rows)

    def fold_input_sums(self, sums: list[tf.Tensor]) -> None:
        """Fold summed ``input_sums`` into the running input statistics."""
        if self.inputs is not None:
            self.inputs.fold_sums(sums)

    def input_state(self) -> list[tf.Variable]:
        """The running input statistics' variables ([] when the model keeps none)."""
        return [] if self.inputs is None else self.inputs.state()

    def observation(self, z: tf.Tensor, c: tf.Tensor) -> tfd.Distribution:
        """p(x|z, c) for z [..., B, latent_size]; the context is broadcast over the leading sample axes."""
        leading = tf.shape(z)[:-1]
        inputs = z
        if self.context_dim:
            context = tf.broadcast_to(c, tf.concat([leading, [self.context_dim]], axis=0))
            inputs = tf.concat([z, tf.cast(context, z.dtype)], axis=-1)
        params = self.decoder(tf.reshape(inputs, [-1, self.latent.latent_size + self.context_dim]))
        params = tf.reshape(params, tf.concat([leading, [self.likelihood.param_size]], axis=0))
        return self.likelihood.distribution(params)

    def dimension_log_likelihood(self, x: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
        """log p(x_g | z, c) per column group g at the posterior location of z, [B, G], to explain a
        low reconstruction term: one group per feature under a schema (masked ones 0), else per dim.

        The location is deterministic: the posterior mean for Gaussian latents, the one-hot of each
        variable's most probable class for Gumbel-softmax ones. Graph- and XLA-friendly.
        """
        loc, _ = self.latent.summary(self.encode(x, c), tf.constant(0, tf.int64))
        if isinstance(self.latent, GumbelSoftmax):
            shape = tf.shape(loc)
            probs = tf.reshape(loc, [-1, self.latent.count, self.latent.classes])
            hot = tf.one_hot(tf.argmax(probs, axis=-1), self.latent.classes, dtype=loc.dtype)
            loc = tf.reshape(hot, shape)
        p = self.observation(tf.cast(loc, tf.float32), c)
        if isinstance(p, MixedObservation):
            return p.log_prob_parts(x)
        if isinstance(p, tfd.Independent):
            return p.distribution.log_prob(tf.cast(x, tf.float32))
        raise TypeError(f"no per-dimension log-likelihood for {type(p).__name__}")


def build_latent(settings: ModelSettings) -> LatentFamily:
    if settings.latent == "gaussian":
        return DiagonalGaussian(settings.latent_dim, settings.min_posterior_scale)
    if settings.latent == "gumbel_softmax":
        return GumbelSoftmax(
            settings.categorical_variables,
            settings.categories,
            settings.temperature_start,
            settings.temperature_floor,
            settings.temperature_rate,
            settings.straight_through,
        )
    raise ConfigError(f"model.latent: unsupported value {settings.latent!r}")


def build_likelihood(settings: ModelSettings, input_dim: int) -> Likelihood:
    if settings.likelihood == "bernoulli":
        return BernoulliLikelihood(input_dim)
    if settings.likelihood == "continuous_bernoulli":
        return ContinuousBernoulliLikelihood(input_dim)
    if settings.likelihood == "gaussian":
        return GaussianLikelihood(
            input_dim,
            settings.observation_scale,
            settings.learn_observation_scale,
            settings.min_observation_scale,
        )
    if settings.likelihood == "poisson":
        return PoissonLikelihood(input_dim)
    if settings.likelihood == "binomial":
        if settings.binomial_total_count is None:
            raise ConfigError("model.likelihood=binomial needs model.binomial_total_count")
        return BinomialLikelihood(input_dim, settings.binomial_total_count)
    raise ConfigError(f"model.likelihood: unsupported value {settings.likelihood!r}")


def build_vae(
    model: ModelSettings,
    training: TrainingSettings,
    input_dim: int,
    context_dim: int = 0,
    inputs: InputSettings | None = None,
) -> VAE:
    """The VAE described by the model settings, under the training dtype policy; with a feature
    schema in ``inputs``, its mixed-type likelihood and (unless turned off) online normaliser."""
    policy = "float32" if training.mixed_precision == "off" else training.mixed_precision
    features: FeatureInputs | None = None
    likelihood: Likelihood
    if inputs is not None and inputs.features is not None:
        layout = FeatureLayout(tuple(inputs.features))
        normaliser = (
            RunningMoments(len(layout.numeric), inputs.normalise_warmup) if inputs.normalise else None
        )
        features = FeatureInputs(layout, normaliser)
        likelihood = MixedLikelihood(layout, features, model.numeric_likelihood)
        input_dim = layout.dim
    else:
        likelihood = build_likelihood(model, input_dim)
    return VAE(
        input_dim=input_dim,
        latent=build_latent(model),
        likelihood=likelihood,
        inputs=features,
        encoder_hidden=list(model.encoder_hidden),
        decoder_hidden=model.decoder_widths,
        activation=model.activation,
        dtype_policy=policy,
        seed=training.seed,
        context_dim=context_dim,
    )
