"""The estimator interface: a strategy that turns (model, batch) into per-record bound terms and a loss."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import tensorflow as tf

from streamvi.model.base import LatentSample
from streamvi.model.vae import VAE


@dataclass(frozen=True)
class BoundTerms:
    """Per-record outputs of one estimator evaluation; every field has shape [B] or [B, D].

    ``bound`` is the estimate of the per-record lower bound the estimator optimises (reported and
    published); ``kl`` and ``reconstruction`` are the two parts of the ELBO (for the importance-
    weighted bounds, their sample means); ``surrogate`` is the per-record quantity whose gradient
    is the estimator's gradient (equal to ``bound`` only for plain reparameterised estimators).
    ``signal`` is the score-function learning signal, when there is one.
    """

    bound: tf.Tensor
    kl: tf.Tensor
    reconstruction: tf.Tensor
    surrogate: tf.Tensor
    z_loc: tf.Tensor
    z_scale: tf.Tensor
    signal: tf.Tensor | None = None


@dataclass(frozen=True)
class Draws:
    """Encoder outputs, latent draws and the log-densities built from them, each [S, B]."""

    params: tf.Tensor
    sample: LatentSample
    log_likelihood: tf.Tensor

    @property
    def log_weight(self) -> tf.Tensor:
        """log p(x|z) + log p(z) - log q(z|x): the importance log-weight of each draw."""
        return self.log_likelihood + self.sample.log_prior - self.sample.log_q

    def summary(self, model: VAE, step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return model.latent.summary(self.params, step)


def draw(
    model: VAE,
    x: tf.Tensor,
    c: tf.Tensor,
    samples: int,
    seed: tf.Tensor,
    step: tf.Tensor,
    reparameterized: bool = True,
) -> Draws:
    """Encode, draw ``samples`` latents per record and evaluate log p(x|z) for each."""
    params = model.encode(x, c)
    sample = model.latent.sample(params, samples, seed, step, reparameterized)
    return Draws(params, sample, model.observation(sample.decoder_input, c).log_prob(x))


def log_mean_exp(values: tf.Tensor, axis: int = 0) -> tf.Tensor:
    count = tf.cast(tf.shape(values)[axis], values.dtype)
    return tf.reduce_logsumexp(values, axis=axis) - tf.math.log(count)


def log_likelihood_estimate(
    model: VAE, x: tf.Tensor, c: tf.Tensor, samples: int, seed: tf.Tensor, step: tf.Tensor
) -> tf.Tensor:
    """Importance-weighted estimate of log p(x) per record with ``samples`` draws from q (IWAE-k).

    A stochastic lower bound whose expectation increases to log p(x) as ``samples`` grows.
    """
    return log_mean_exp(draw(model, x, c, samples, seed, step).log_weight)


class Estimator(tf.Module, ABC):
    """A gradient estimator for a lower bound on log p(x); hyperparameters live in ``__init__``.

    A ``tf.Module`` so that any state it keeps (a baseline) is trained and checkpointed with the model.
    """

    #: Config name of the estimator (``training.estimator``).
    name: str

    def __init__(self, samples: int = 1) -> None:
        super().__init__(name=f"{self.name}_estimator")
        if samples < 1:
            raise ValueError("samples must be >= 1")
        self.samples = samples

    @property
    def bound_name(self) -> str:
        """Name of the bound it estimates, published with every latent and metric."""
        return "elbo"

    @abstractmethod
    def terms(self, model: VAE, x: tf.Tensor, c: tf.Tensor, seed: tf.Tensor, step: tf.Tensor) -> BoundTerms:
        """Per-record terms for a batch ``x`` [B, D], context ``c`` [B, C], stateless ``seed`` [2]."""

    def loss(self, terms: BoundTerms, weights: tf.Tensor) -> tf.Tensor:
        """Scalar loss to minimise: the negative weighted mean surrogate (weight 0 = padding or held out)."""
        weights = tf.cast(weights, terms.surrogate.dtype)
        return -tf.reduce_sum(terms.surrogate * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


def elbo_parts(draws: Draws) -> tuple[tf.Tensor, tf.Tensor]:
    """Monte Carlo KL(q || p) and reconstruction E_q[log p(x|z)], per record."""
    kl = tf.reduce_mean(draws.sample.log_q - draws.sample.log_prior, axis=0)
    return kl, tf.reduce_mean(draws.log_likelihood, axis=0)
