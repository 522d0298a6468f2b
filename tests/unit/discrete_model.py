"""A small discrete-latent VAE whose log p(x), posterior, ELBO and IWAE-k are all computed by enumeration.

M = 2 categorical latents with K = 3 classes each (9 configurations of z), a uniform prior, a
linear encoder (logits of q(z|x)) and a linear decoder into 6 Bernoulli pixels. Every quantity
below is an exact sum over the 9 configurations (or over the 9^k draws of an IWAE-k bound), and
is differentiable in the model's variables, so gradients are exact too.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tensorflow_probability import distributions as tfd

from streamvi.model.latents import GumbelSoftmax
from streamvi.model.likelihoods import BernoulliLikelihood
from streamvi.model.vae import VAE

VARIABLES, CLASSES, PIXELS = 2, 3, 6


def configurations() -> np.ndarray:
    """Every z as a flattened [M * K] one-hot vector, [K^M, M * K]."""
    eye = np.eye(CLASSES, dtype=np.float32)
    return np.array(
        [
            np.concatenate([eye[c] for c in combo])
            for combo in itertools.product(range(CLASSES), repeat=VARIABLES)
        ]
    )


@dataclass
class DiscreteModel:
    model: VAE

    @classmethod
    def make(
        cls, seed: int = 0, temperature: float = 0.7, straight_through: bool = False, scale: float = 1.5
    ) -> DiscreteModel:
        latent = GumbelSoftmax(
            VARIABLES,
            CLASSES,
            temperature_start=temperature,
            temperature_floor=temperature,
            straight_through=straight_through,
        )
        model = VAE(
            input_dim=PIXELS,
            latent=latent,
            likelihood=BernoulliLikelihood(PIXELS),
            encoder_hidden=[],
            decoder_hidden=[],
            activation="linear",
        )
        rng = np.random.default_rng(seed)
        for network in (model.encoder, model.decoder):
            layer = network.layers[-1]
            kernel, bias = (w.shape for w in layer.get_weights())
            layer.set_weights(
                [
                    (scale * rng.normal(size=kernel)).astype(np.float32),
                    (0.5 * scale * rng.normal(size=bias)).astype(np.float32),
                ]
            )
        return cls(model)

    def sample(self, n: int, seed: int = 1) -> np.ndarray:
        """Binary images drawn from the model's own generative process."""
        rng = np.random.default_rng(seed)
        z = configurations()[rng.integers(0, CLASSES**VARIABLES, n)]
        logits = self.model.decoder(tf.constant(z)).numpy()
        return (rng.random((n, PIXELS)) < 1 / (1 + np.exp(-logits))).astype(np.float32)

    def log_joint_and_q(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """log p(x, z) and log q(z|x) for every configuration z, each [N, K^M]."""
        z = tf.constant(configurations())
        logits = self.model.decoder(z)  # [K^M, D]
        log_lik = tfd.Independent(tfd.Bernoulli(logits=logits[None]), 1).log_prob(x[:, None, :])
        log_prior = -VARIABLES * math.log(CLASSES)
        enc = tf.reshape(self.model.encoder(x), [-1, VARIABLES, CLASSES])
        log_q_each = tf.nn.log_softmax(enc, axis=-1)  # [N, M, K]
        log_q = tf.einsum("nmk,jmk->nj", log_q_each, tf.reshape(z, [-1, VARIABLES, CLASSES]))
        return log_lik + log_prior, log_q

    def log_evidence(self, x: tf.Tensor) -> tf.Tensor:
        log_joint, _ = self.log_joint_and_q(x)
        return tf.reduce_logsumexp(log_joint, axis=1)

    def elbo(self, x: tf.Tensor) -> tf.Tensor:
        """The discrete ELBO sum_z q(z|x) (log p(x, z) - log q(z|x)), per record."""
        log_joint, log_q = self.log_joint_and_q(x)
        return tf.reduce_sum(tf.exp(log_q) * (log_joint - log_q), axis=1)

    def iwae(self, x: tf.Tensor, k: int) -> tf.Tensor:
        """E[log (1/k) sum_i p(x, z_i) / q(z_i|x)] over k independent draws z_i ~ q, by summing
        over all (K^M)^k draws, per record."""
        log_joint, log_q = self.log_joint_and_q(x)
        log_w = log_joint - log_q
        draws = np.array(list(itertools.product(range(CLASSES**VARIABLES), repeat=k)))  # [T, k]
        w = tf.gather(log_w, draws, axis=1)  # [N, T, k]
        probability = tf.exp(tf.reduce_sum(tf.gather(log_q, draws, axis=1), axis=2))  # [N, T]
        bound = tf.reduce_logsumexp(w, axis=2) - math.log(k)
        return tf.reduce_sum(probability * bound, axis=1)
