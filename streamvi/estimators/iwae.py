"""Importance-weighted bounds: IWAE (Burda et al. 2016) and its doubly-reparameterised gradient."""

from __future__ import annotations

import tensorflow as tf

from streamvi.estimators.base import BoundTerms, Estimator, draw, elbo_parts, exact_draws, log_mean_exp
from streamvi.model.vae import VAE


class ImportanceWeighted(Estimator):
    """log (1/k) sum_i p(x, z_i) / q(z_i|x) with k reparameterised draws: a tighter bound than the ELBO.

    With relaxed (Gumbel-softmax) draws the gradient is the relaxed model's; the reported bound is
    the discrete model's IWAE-k, on k exact draws.
    """

    name = "iwae"

    @property
    def bound_name(self) -> str:
        return f"iwae-{self.samples}"

    def terms(self, model: VAE, x: tf.Tensor, c: tf.Tensor, seed: tf.Tensor, step: tf.Tensor) -> BoundTerms:
        draws = draw(model, x, c, self.samples, seed, step)
        exact = exact_draws(model, x, c, draws, seed, step)
        bound = log_mean_exp(exact.exact_log_weight)
        surrogate = bound if exact is draws else log_mean_exp(draws.log_weight)
        kl, reconstruction = elbo_parts(exact)
        z_loc, z_scale = draws.summary(model, step)
        return BoundTerms(bound, kl, reconstruction, surrogate, z_loc, z_scale)


class DoublyReparameterized(ImportanceWeighted):
    """The IWAE bound with the DReG gradient (Tucker et al. 2019).

    Decoder: sum_i w_i grad log w_i, the IWAE gradient. Encoder: sum_i w_i^2 (d log w_i / d z_i)
    (dz_i / dphi) with log q held fixed in phi, which removes the score-function terms whose
    variance grows with k. One surrogate gives both: sum_i w_i^2 log w_i(z_i) carries the encoder
    path and w_i^2 of the decoder's; sum_i (w_i - w_i^2) log p(x | stop(z_i)) tops the decoder up to w_i.
    """

    name = "dreg"

    def terms(self, model: VAE, x: tf.Tensor, c: tf.Tensor, seed: tf.Tensor, step: tf.Tensor) -> BoundTerms:
        draws = draw(model, x, c, self.samples, seed, step)
        sample = draws.sample
        weights = tf.stop_gradient(tf.nn.softmax(draws.log_weight, axis=0))  # normalised, [S, B]
        log_weight_path = draws.log_likelihood + sample.log_prior - sample.log_q_stopped
        decoder_only = model.observation(tf.stop_gradient(sample.decoder_input), c).log_prob(x)
        surrogate = tf.reduce_sum(
            weights**2 * log_weight_path + (weights - weights**2) * decoder_only, axis=0
        )
        exact = exact_draws(model, x, c, draws, seed, step)
        bound = log_mean_exp(exact.exact_log_weight)
        kl, reconstruction = elbo_parts(exact)
        z_loc, z_scale = draws.summary(model, step)
        return BoundTerms(bound, kl, reconstruction, surrogate, z_loc, z_scale)
