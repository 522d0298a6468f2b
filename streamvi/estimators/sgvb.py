"""SGVB estimators A and B (Kingma & Welling 2014, eqs. 6 and 7), both reparameterised."""

from __future__ import annotations

import tensorflow as tf

from streamvi.estimators.base import BoundTerms, Estimator, draw, elbo_parts, exact_draws
from streamvi.model.vae import VAE


class SGVBMonteCarlo(Estimator):
    """Estimator A: the ELBO as the Monte Carlo mean of log p(x, z) - log q(z|x), z = g(eps, x).

    With relaxed (Gumbel-softmax) draws the gradient is that of the relaxed model's ELBO, with the
    relaxed densities on both sides; the reported ELBO is the discrete model's, on exact draws.
    """

    name = "sgvb_a"

    def terms(self, model: VAE, x: tf.Tensor, c: tf.Tensor, seed: tf.Tensor, step: tf.Tensor) -> BoundTerms:
        draws = draw(model, x, c, self.samples, seed, step)
        exact = exact_draws(model, x, c, draws, seed, step)
        bound = tf.reduce_mean(exact.exact_log_weight, axis=0)
        surrogate = bound if exact is draws else tf.reduce_mean(draws.log_weight, axis=0)
        kl, reconstruction = elbo_parts(exact)
        z_loc, z_scale = draws.summary(model, step)
        return BoundTerms(bound, kl, reconstruction, surrogate, z_loc, z_scale)


class SGVBAnalyticKL(Estimator):
    """Estimator B: ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)), with the KL in closed form.

    The expectation is a Monte Carlo mean over ``samples`` reparameterised draws per record, so
    the gradient flows through the sample path; the KL term has no sampling variance at all. The
    closed-form KL is that of the model's own latent, so it is paired only with a reconstruction on
    exact draws of it (Gaussian, straight-through one-hot). Relaxed Gumbel-softmax draws have no
    closed-form KL: their gradient is the relaxed ELBO's, with the Monte Carlo KL that matches the
    samples, and the reported bound is estimator B of the discrete model on fresh exact draws.
    """

    name = "sgvb_b"

    def terms(self, model: VAE, x: tf.Tensor, c: tf.Tensor, seed: tf.Tensor, step: tf.Tensor) -> BoundTerms:
        draws = draw(model, x, c, self.samples, seed, step)
        exact = exact_draws(model, x, c, draws, seed, step)
        kl = model.latent.analytic_kl(draws.params, step)
        reconstruction = tf.reduce_mean(exact.log_likelihood, axis=0)
        bound = reconstruction - kl
        surrogate = bound if exact is draws else tf.reduce_mean(draws.log_weight, axis=0)
        z_loc, z_scale = draws.summary(model, step)
        return BoundTerms(bound, kl, reconstruction, surrogate, z_loc, z_scale)


class StickingTheLanding(Estimator):
    """The ELBO with the score term of q dropped (Roeder et al. 2017): log q is evaluated with the
    encoder outputs held fixed, so only the path derivative remains. Unbiased, and its variance
    vanishes as q approaches the exact posterior."""

    name = "stl"

    def terms(self, model: VAE, x: tf.Tensor, c: tf.Tensor, seed: tf.Tensor, step: tf.Tensor) -> BoundTerms:
        draws = draw(model, x, c, self.samples, seed, step)
        exact = exact_draws(model, x, c, draws, seed, step)
        bound = tf.reduce_mean(exact.exact_log_weight, axis=0)
        sample = draws.sample
        surrogate = tf.reduce_mean(draws.log_likelihood + sample.log_prior - sample.log_q_stopped, axis=0)
        kl, reconstruction = elbo_parts(exact)
        z_loc, z_scale = draws.summary(model, step)
        return BoundTerms(bound, kl, reconstruction, surrogate, z_loc, z_scale)
