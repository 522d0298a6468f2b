"""A linear-Gaussian VAE whose log p(x), exact posterior and ELBO are all closed form.

p(z) = N(0, I_d), p(x|z) = N(W z + b, s^2 I_D). W has orthogonal columns, so the exact posterior
N(S W^T (x - b) / s^2, S) with S = (I + W^T W / s^2)^-1 is diagonal and a linear encoder with a
constant scale represents it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from streamvi.model.latents import DiagonalGaussian
from streamvi.model.likelihoods import GaussianLikelihood
from streamvi.model.vae import VAE

MIN_SCALE = 1e-4


@dataclass
class LinearGaussian:
    w: np.ndarray  # [D, d]
    b: np.ndarray  # [D]
    s: float

    @classmethod
    def make(
        cls, data_dim: int = 5, latent_dim: int = 2, s: float = 0.7, seed: int = 0, orthogonal: bool = True
    ) -> LinearGaussian:
        """A random model; with ``orthogonal=False`` the exact posterior is correlated."""
        rng = np.random.default_rng(seed)
        if orthogonal:
            q, _ = np.linalg.qr(rng.normal(size=(data_dim, latent_dim)))
            w = q * np.linspace(1.5, 0.8, latent_dim)
        else:
            w = rng.normal(size=(data_dim, latent_dim))
            w[:, 1] += 0.9 * w[:, 0]  # strongly correlated columns: a correlated exact posterior
        return cls(w=w, b=rng.normal(size=data_dim) * 0.5, s=s)

    @property
    def data_dim(self) -> int:
        return self.w.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.w.shape[1]

    def sample(self, n: int, seed: int = 1) -> np.ndarray:
        rng = np.random.default_rng(seed)
        z = rng.normal(size=(n, self.latent_dim))
        return (z @ self.w.T + self.b + self.s * rng.normal(size=(n, self.data_dim))).astype(np.float32)

    @property
    def posterior_precision(self) -> np.ndarray:
        """Lambda = I + W^T W / s^2, the precision of the exact posterior (the same for every x)."""
        return np.eye(self.latent_dim) + self.w.T @ self.w / self.s**2

    def posterior_cov_diag(self) -> np.ndarray:
        return np.diag(np.linalg.inv(self.posterior_precision))

    def posterior_mean(self, x: np.ndarray) -> np.ndarray:
        return np.linalg.solve(self.posterior_precision, ((x - self.b) @ self.w / self.s**2).T).T

    def log_evidence(self, x: np.ndarray) -> np.ndarray:
        cov = self.w @ self.w.T + self.s**2 * np.eye(self.data_dim)
        diff = x - self.b
        _, logdet = np.linalg.slogdet(cov)
        maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        return -0.5 * (self.data_dim * np.log(2 * np.pi) + logdet + maha)

    def vae(
        self, exact_encoder: bool = True, perturb: float = 0.3, seed: int = 2, freeze_decoder: bool = False
    ) -> VAE:
        """A VAE with this decoder; its encoder is the exact posterior map, or a perturbed one."""
        model = VAE(
            input_dim=self.data_dim,
            latent=DiagonalGaussian(self.latent_dim, MIN_SCALE),
            likelihood=GaussianLikelihood(self.data_dim, self.s),
            encoder_hidden=[],
            decoder_hidden=[],
            activation="linear",
        )
        var = self.posterior_cov_diag()
        cov = np.linalg.inv(self.posterior_precision)
        kernel_loc = self.w @ cov / self.s**2  # m(x) = cov W^T (x - b) / s^2, as x @ kernel + bias
        bias_loc = -(self.b @ self.w) @ cov / self.s**2
        raw_scale = np.log(np.expm1(np.sqrt(var) - MIN_SCALE))
        enc_kernel = np.concatenate([kernel_loc, np.zeros_like(kernel_loc)], axis=1)
        enc_bias = np.concatenate([bias_loc, raw_scale])
        if not exact_encoder:
            rng = np.random.default_rng(seed)
            enc_kernel = enc_kernel + perturb * rng.normal(size=enc_kernel.shape)
            enc_bias = enc_bias + perturb * rng.normal(size=enc_bias.shape)
        model.encoder.layers[-1].set_weights([enc_kernel.astype(np.float32), enc_bias.astype(np.float32)])
        model.decoder.layers[-1].set_weights([self.w.T.astype(np.float32), self.b.astype(np.float32)])
        if freeze_decoder:
            model.decoder.trainable = False
        return model

    def closed_form_elbo(self, model: VAE, x: tf.Tensor) -> tf.Tensor:
        """Exact per-record ELBO of the model's current Gaussian q, differentiable in every variable."""
        m, stddev = model.latent.summary(model.encode(x, tf.zeros([tf.shape(x)[0], 0])), tf.constant(0))
        v = tf.square(stddev)
        kernel, bias = model.decoder.layers[-1].kernel, model.decoder.layers[-1].bias  # kernel = W^T
        resid = x - tf.matmul(m, kernel) - bias
        col_norms = tf.reduce_sum(tf.square(kernel), axis=1)  # ||W_:j||^2
        s2 = self.s**2
        expected_loglik = -0.5 * self.data_dim * np.log(2 * np.pi * s2) - (
            tf.reduce_sum(tf.square(resid), axis=1) + tf.reduce_sum(v * col_norms, axis=1)
        ) / (2 * s2)
        kl = 0.5 * tf.reduce_sum(v + tf.square(m) - 1.0 - tf.math.log(v), axis=1)
        return expected_loglik - kl


def cavi(model: LinearGaussian, x: np.ndarray, sweeps: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Classical mean-field coordinate-ascent VI for q(z) = prod_j N(m_j, v_j), per record.

    The optimal factor for z_j given the others is Gaussian with precision Lambda_jj and mean
    (W^T (x - b) / s^2 - sum_{k != j} Lambda_jk m_k)_j / Lambda_jj (Bishop, PRML 10.1.2); sweeping the
    coordinates in turn increases the ELBO monotonically to the mean-field optimum.
    """
    precision = model.posterior_precision
    target = (x - model.b) @ model.w / model.s**2  # [N, d]
    m = np.zeros_like(target)
    for _ in range(sweeps):
        for j in range(model.latent_dim):
            others = m @ precision[:, j] - m[:, j] * precision[j, j]
            m[:, j] = (target[:, j] - others) / precision[j, j]
    v = np.broadcast_to(1.0 / np.diag(precision), m.shape)
    return m, v
