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

    ``bound`` is the estimate of the per-record lower bound on log p(x) the estimator names
    (reported and published), always evaluated on exact draws of the model's latent, so it is a
    true bound in nats for every latent family; ``kl`` and ``reconstruction`` are the two parts of
    the ELBO on those same draws (for the importance-weighted bounds, their sample means);
    ``surrogate`` is the per-record quantity whose gradient is the estimator's gradient (equal to
    ``bound`` only for plain reparameterised estimators on exact draws; a relaxed Gumbel-softmax
    objective otherwise). ``signal`` is the score-function learning signal, when there is one.
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
        """log p(x|z) + log p(z) - log q(z|x) with the sample's own (possibly relaxed) densities."""
        return self.log_likelihood + self.sample.log_prior - self.sample.log_q

    @property
    def exact_log_weight(self) -> tf.Tensor:
        """The importance log-weight under the model's own latent; only for exact draws."""
        sample = self.sample
        if sample.exact_log_q is None or sample.exact_log_prior is None:
            raise ValueError("relaxed draws have no exact log-weight: use exact_draws()")
        return self.log_likelihood + sample.exact_log_prior - sample.exact_log_q

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


def exact_draws(
    model: VAE, x: tf.Tensor, c: tf.Tensor, draws: Draws, seed: tf.Tensor, step: tf.Tensor
) -> Draws:
    """Draws of the model's own latent for the reported bound: ``draws`` itself when its forward
    values are exact draws of q(z|x), else as many fresh exact (one-hot) draws, forward only.

    Relaxed Gumbel-softmax draws give the training gradient, but a bound computed from them bounds
    the relaxed model, not the discrete one the user reads; so the figure comes from exact draws.
    """
    if draws.sample.exact:
        return draws
    samples = int(draws.log_likelihood.shape[0])
    fresh_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    fresh = draw(model, x, c, samples, fresh_seed, step, reparameterized=False)
    return Draws(tf.stop_gradient(fresh.params), fresh.sample, tf.stop_gradient(fresh.log_likelihood))


def log_mean_exp(values: tf.Tensor, axis: int = 0) -> tf.Tensor:
    count = tf.cast(tf.shape(values)[axis], values.dtype)
    return tf.reduce_logsumexp(values, axis=axis) - tf.math.log(count)


def log_likelihood_estimate(
    model: VAE, x: tf.Tensor, c: tf.Tensor, samples: int, seed: tf.Tensor, step: tf.Tensor
) -> tf.Tensor:
    """Importance-weighted estimate of log p(x) per record with ``samples`` draws from q (IWAE-k).

    Exact draws of the model's latent (one-hot for Gumbel-softmax, with the categorical densities),
    so it is a stochastic lower bound on the model's log p(x) whose expectation increases to it as
    ``samples`` grows.
    """
    return log_mean_exp(draw(model, x, c, samples, seed, step, reparameterized=False).exact_log_weight)


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
        """Scalar loss to minimise: the negative weighted mean surrogate (weight 0 = padding or held out).

        Rows of weight 0 are selected out, not multiplied by 0: an infinite term there (a held-out
        outlier) would otherwise make the whole batch's loss 0 x inf = NaN.
        """
        return -masked_mean(terms.surrogate, weights)

    def summed_loss(self, terms: BoundTerms, weights: tf.Tensor) -> tf.Tensor:
        """``loss`` times the batch's total weight: the negative weighted sum of the surrogate.

        Sums add across workers, so the all-reduced sum divided by the all-reduced weight is the
        loss of the union of their batches (streamvi/training/distributed.py).
        """
        return -masked_sum(terms.surrogate, weights)

    def update_state(self, terms: BoundTerms, weights: tf.Tensor) -> None:
        """Fold a batch into the estimator's own running state (none by default). The trainer calls
        it inside the step, only when the batch's update is applied."""
        self.fold_state_sums(self.state_sums(terms, weights))

    def state_sums(self, terms: BoundTerms, weights: tf.Tensor) -> list[tf.Tensor]:
        """A batch's part of the running state's next update, as sums that add across the batches
        of one distributed step (summed over workers before :meth:`fold_state_sums`); [] when the
        estimator keeps no running state."""
        return []

    def fold_state_sums(self, sums: list[tf.Tensor]) -> None:
        """Fold the summed :meth:`state_sums` of one step's batches into the running state."""
        return

    def state(self) -> list[tf.Variable]:
        """The running state's variables (equal on every distributed worker)."""
        return []


def masked_sum(values: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Weighted sum of ``values`` [B] over the rows of positive weight (the others are selected
    out, so an infinite value there adds nothing); 0 when there are none."""
    weights = tf.cast(weights, values.dtype)
    return tf.reduce_sum(tf.where(weights > 0, values * weights, tf.zeros_like(values)))


def masked_mean(values: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Weighted mean of ``values`` [B] over the rows of positive weight; 0 when there are none."""
    total = tf.reduce_sum(tf.cast(weights, values.dtype))
    return masked_sum(values, weights) / tf.maximum(total, 1.0)


def elbo_parts(draws: Draws) -> tuple[tf.Tensor, tf.Tensor]:
    """Monte Carlo KL(q || p) and reconstruction E_q[log p(x|z)] per record, on exact draws."""
    sample = draws.sample
    if sample.exact_log_q is None or sample.exact_log_prior is None:
        raise ValueError("relaxed draws have no exact KL: use exact_draws()")
    kl = tf.reduce_mean(sample.exact_log_q - sample.exact_log_prior, axis=0)
    return kl, tf.reduce_mean(draws.log_likelihood, axis=0)
