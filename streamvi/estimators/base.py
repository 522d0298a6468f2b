"""The estimator interface: a strategy that turns (model, batch) into per-record bound terms and a loss."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import tensorflow as tf

from streamvi.model.vae import VAE


@dataclass(frozen=True)
class BoundTerms:
    """Per-record outputs of one estimator evaluation; every field has shape [B] or [B, D].

    ``bound`` is the estimate of the per-record lower bound the estimator optimises (reported and
    published); ``surrogate`` is the per-record quantity whose gradient is the estimator's
    gradient of that bound (equal to ``bound`` for plain reparameterised estimators).
    """

    bound: tf.Tensor
    kl: tf.Tensor
    reconstruction: tf.Tensor
    surrogate: tf.Tensor
    z_loc: tf.Tensor
    z_scale: tf.Tensor


class Estimator(ABC):
    """A gradient estimator for a lower bound on log p(x); hyperparameters live in ``__init__``."""

    #: Config name of the estimator (``training.estimator``).
    name: str
    #: Name of the bound it estimates, published with every latent and metric.
    bound_name: str

    def __init__(self, samples: int = 1) -> None:
        if samples < 1:
            raise ValueError("samples must be >= 1")
        self.samples = samples

    @abstractmethod
    def terms(self, model: VAE, x: tf.Tensor, seed: tf.Tensor) -> BoundTerms:
        """Per-record bound terms for a batch ``x`` [B, D] using the stateless ``seed`` [2]."""

    def loss(self, terms: BoundTerms, mask: tf.Tensor) -> tf.Tensor:
        """Scalar loss to minimise: the negative mean surrogate over the real (unmasked) records."""
        weight = tf.cast(mask, terms.surrogate.dtype)
        return -tf.reduce_sum(terms.surrogate * weight) / tf.maximum(tf.reduce_sum(weight), 1.0)
