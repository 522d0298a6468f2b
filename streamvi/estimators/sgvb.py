"""SGVB estimators A and B (Kingma & Welling 2014, eqs. 6 and 7), both reparameterised."""

from __future__ import annotations

import tensorflow as tf

from streamvi.estimators.base import BoundTerms, Estimator, draw, elbo_parts
from streamvi.model.vae import VAE


class SGVBMonteCarlo(Estimator):
    """Estimator A: the ELBO as the Monte Carlo mean of log p(x, z) - log q(z|x), z = g(eps, x)."""

    name = "sgvb_a"

    def terms(self, model: VAE, x: tf.Tensor, c: tf.Tensor, seed: tf.Tensor, step: tf.Tensor) -> BoundTerms:
        draws = draw(model, x, c, self.samples, seed, step)
        bound = tf.reduce_mean(draws.log_weight, axis=0)
        kl, reconstruction = elbo_parts(draws)
        z_loc, z_scale = draws.summary(model, step)
        return BoundTerms(bound, kl, reconstruction, bound, z_loc, z_scale)


class SGVBAnalyticKL(Estimator):
    """Estimator B: ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)), with the KL in closed form.

    The expectation is a Monte Carlo mean over ``samples`` reparameterised draws per record, so
    the gradient flows through the sample path; the KL term has no sampling variance at all.
    """

    name = "sgvb_b"

    def terms(self, model: VAE, x: tf.Tensor, c: tf.Tensor, seed: tf.Tensor, step: tf.Tensor) -> BoundTerms:
        draws = draw(model, x, c, self.samples, seed, step)
        reconstruction = tf.reduce_mean(draws.log_likelihood, axis=0)
        kl = model.latent.analytic_kl(draws.params, step)
        bound = reconstruction - kl
        z_loc, z_scale = draws.summary(model, step)
        return BoundTerms(bound, kl, reconstruction, bound, z_loc, z_scale)


class StickingTheLanding(Estimator):
    """The ELBO with the score term of q dropped (Roeder et al. 2017): log q is evaluated with the
    encoder outputs held fixed, so only the path derivative remains. Unbiased, and its variance
    vanishes as q approaches the exact posterior."""

    name = "stl"

    def terms(self, model: VAE, x: tf.Tensor, c: tf.Tensor, seed: tf.Tensor, step: tf.Tensor) -> BoundTerms:
        draws = draw(model, x, c, self.samples, seed, step)
        bound = tf.reduce_mean(draws.log_weight, axis=0)
        sample = draws.sample
        surrogate = tf.reduce_mean(draws.log_likelihood + sample.log_prior - sample.log_q_stopped, axis=0)
        kl, reconstruction = elbo_parts(draws)
        z_loc, z_scale = draws.summary(model, step)
        return BoundTerms(bound, kl, reconstruction, surrogate, z_loc, z_scale)
