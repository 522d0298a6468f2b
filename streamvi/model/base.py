"""Interfaces of the model's parts: a latent family (q(z|x) and its prior) and an observation likelihood."""

from __future__ import annotations

from abc import ABC, abstractmethod

import tensorflow as tf
from tensorflow_probability import distributions as tfd


class LatentFamily(ABC):
    """The variational family q(z|x) the encoder parameterises, and the prior p(z)."""

    name: str

    def __init__(self, latent_dim: int) -> None:
        self.latent_dim = latent_dim

    @property
    @abstractmethod
    def param_size(self) -> int:
        """Width of the encoder output that parameterises q(z|x)."""

    @abstractmethod
    def posterior(self, params: tf.Tensor) -> tfd.Distribution:
        """q(z|x) from encoder outputs; batch shape [B], event shape [latent_dim]."""

    @abstractmethod
    def prior(self, batch_shape: tf.Tensor) -> tfd.Distribution:
        """p(z), broadcast to the given batch shape."""

    @abstractmethod
    def summary(self, posterior: tfd.Distribution) -> tuple[tf.Tensor, tf.Tensor]:
        """Per-record location and scale of q(z|x), as published on the latents topic."""


class Likelihood(ABC):
    """The observation model p(x|z) given decoder outputs."""

    name: str

    def __init__(self, dim: int) -> None:
        self.dim = dim

    @property
    @abstractmethod
    def param_size(self) -> int:
        """Width of the decoder output that parameterises p(x|z)."""

    @abstractmethod
    def distribution(self, params: tf.Tensor) -> tfd.Distribution:
        """p(x|z) with event shape [dim] and the batch shape of ``params`` minus its last axis."""
