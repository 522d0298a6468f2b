"""Interfaces of the model's parts: a latent family (q(z|x), its prior, its samples) and a likelihood."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import tensorflow as tf
from tensorflow_probability import distributions as tfd


@dataclass(frozen=True)
class LatentSample:
    """Draws from q(z|x) and the densities every estimator needs, each of shape [S, B].

    ``log_q_stopped`` is log q evaluated with the encoder's outputs held constant, so its gradient
    flows only through the sample path (sticking-the-landing and DReG use it); for a sample drawn
    without reparameterisation (score function) the sample itself carries no gradient.
    """

    decoder_input: tf.Tensor  # [S, B, latent_size]
    log_q: tf.Tensor
    log_q_stopped: tf.Tensor
    log_prior: tf.Tensor
    #: log q(z|x) and log p(z) of the decoder input's forward value under the model's own latent
    #: distribution, when that value is an exact draw of q(z|x): the reported bounds are built from
    #: these. None for relaxed (Gumbel-softmax) draws, which are not draws of the model's latent.
    exact_log_q: tf.Tensor | None = None
    exact_log_prior: tf.Tensor | None = None

    @property
    def exact(self) -> bool:
        """True when the decoder's forward input is an exact draw of q(z|x) with known densities."""
        return self.exact_log_q is not None and self.exact_log_prior is not None


class LatentFamily(tf.Module, ABC):
    """The variational family q(z|x) parameterised by the encoder, with its prior p(z)."""

    name: str

    @property
    @abstractmethod
    def param_size(self) -> int:
        """Width of the encoder output that parameterises q(z|x)."""

    @property
    @abstractmethod
    def latent_size(self) -> int:
        """Width of z as the decoder sees it."""

    @abstractmethod
    def sample(
        self, params: tf.Tensor, samples: int, seed: tf.Tensor, step: tf.Tensor, reparameterized: bool = True
    ) -> LatentSample:
        """``samples`` draws per record; reparameterised (pathwise gradients) unless told otherwise.

        Draws without reparameterisation are always exact draws of q(z|x) (``LatentSample.exact``).
        """

    @abstractmethod
    def analytic_kl(self, params: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        """KL(q(z|x) || p(z)) in closed form, shape [B]."""

    @abstractmethod
    def summary(self, params: tf.Tensor, step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Per-record location and scale of q(z|x) as published, each [B, summary_size]."""

    @property
    @abstractmethod
    def summary_size(self) -> int:
        """Width of the published location and scale vectors."""


class Likelihood(tf.Module, ABC):
    """The observation model p(x|z) given decoder outputs; may own trainable variables."""

    name: str

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    @property
    @abstractmethod
    def param_size(self) -> int:
        """Width of the decoder output that parameterises p(x|z)."""

    @abstractmethod
    def distribution(self, params: tf.Tensor) -> tfd.Distribution:
        """p(x|z) with event shape [dim] and the batch shape of ``params`` minus its last axis."""
