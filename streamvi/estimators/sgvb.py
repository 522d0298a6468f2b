"""SGVB estimator B (Kingma & Welling 2014, eq. 7): analytic KL plus a reparameterised reconstruction."""

from __future__ import annotations

import tensorflow as tf

from streamvi.estimators.base import BoundTerms, Estimator
from streamvi.model.vae import VAE


class SGVBAnalyticKL(Estimator):
    """ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)), with z = g(eps, x) and the KL in closed form.

    The expectation is a Monte Carlo mean over ``samples`` reparameterised draws per record, so
    the gradient flows through the sample path; the KL term has no sampling variance at all.
    """

    name = "sgvb_b"
    bound_name = "elbo"

    def terms(self, model: VAE, x: tf.Tensor, seed: tf.Tensor) -> BoundTerms:
        posterior = model.posterior(x)
        z = posterior.sample(self.samples, seed=seed)  # [S, B, latent]
        reconstruction = tf.reduce_mean(model.observation(z).log_prob(x), axis=0)
        kl = posterior.kl_divergence(model.prior(tf.shape(x)[:1]))
        bound = reconstruction - kl
        z_loc, z_scale = model.latent.summary(posterior)
        return BoundTerms(bound, kl, reconstruction, bound, z_loc, z_scale)
