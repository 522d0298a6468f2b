"""The score-function (REINFORCE, black-box VI) gradient with a control-variate baseline.

grad_phi ELBO = E_q[grad_phi log q(z|x) (log p(x, z) - log q(z|x))]: it needs only log-densities,
not a differentiable sample path, so it also works for exactly discrete latents; it is unbiased but
noisy. Subtracting a baseline b that does not depend on z keeps it unbiased (E_q[grad log q] = 0)
and reduces the variance. The decoder still gets its ordinary gradient E_q[grad_theta log p(x|z)].
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras

from streamvi.estimators.base import BoundTerms, Estimator, draw, elbo_parts, masked_sum
from streamvi.model.vae import VAE


class ScoreFunction(Estimator):
    """REINFORCE with an optional baseline.

    ``baseline``: ``none``; ``running_mean`` (a bias-corrected exponential moving average of the
    batch-mean learning signal); ``learned`` (the running mean plus a small network b(x, c) fitted to
    the residual per record, with a Huber loss so its gradients stay on the scale of the others).
    """

    name = "score_function"

    def __init__(
        self,
        samples: int = 1,
        baseline: str = "running_mean",
        decay: float = 0.99,
        input_width: int = 0,
        hidden: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(samples)
        if baseline not in ("none", "running_mean", "learned"):
            raise ValueError(f"unknown baseline {baseline!r}")
        self.baseline = baseline
        self.decay = decay
        self.running_sum = tf.Variable(0.0, trainable=False, name="baseline_running_sum")
        self.running_weight = tf.Variable(0.0, trainable=False, name="baseline_running_weight")
        self.network: tf_keras.Sequential | None = None
        if baseline == "learned":
            if input_width < 1:
                raise ValueError("a learned baseline needs the input width")
            self.network = tf_keras.Sequential(
                [
                    tf_keras.Input(shape=(input_width,)),
                    tf_keras.layers.Dense(
                        hidden,
                        activation="tanh",
                        kernel_initializer=tf_keras.initializers.GlorotUniform(seed=seed + 2000),
                    ),
                    tf_keras.layers.Dense(1, kernel_initializer="zeros"),
                ],
                name="score_function_baseline",
            )

    def running_mean(self) -> tf.Tensor:
        """The bias-corrected moving average of the learning signal (0 before any update)."""
        return self.running_sum / tf.maximum(self.running_weight, 1e-8)

    def _baseline(self, x: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
        if self.baseline == "none":
            return tf.zeros(tf.shape(x)[:1])
        value = tf.fill(tf.shape(x)[:1], self.running_mean())
        if self.network is not None:
            features = tf.concat([x, c], axis=-1)
            value = value + tf.squeeze(self.network(features), axis=-1)
        return value

    def terms(self, model: VAE, x: tf.Tensor, c: tf.Tensor, seed: tf.Tensor, step: tf.Tensor) -> BoundTerms:
        draws = draw(model, x, c, self.samples, seed, step, reparameterized=False)
        signal = tf.stop_gradient(draws.log_weight)  # [S, B], the learning signal per draw
        # the baseline sees what the encoder sees (under a feature schema: the prepared features)
        baseline = self._baseline(x if model.inputs is None else model.inputs(x), c)  # [B]
        advantage = signal - tf.stop_gradient(baseline)
        # A non-finite signal (an outlier's infinite term) gets no gradient: in a held-out or padding
        # row the loss's zero weight would meet it as 0 x inf = NaN; in a trained row the loss
        # itself is then non-finite and the step skips its update.
        advantage = tf.where(tf.math.is_finite(advantage), advantage, tf.zeros_like(advantage))
        surrogate = tf.reduce_mean(advantage * draws.sample.log_q + draws.log_likelihood, axis=0)
        if self.network is not None:
            residual = tf.abs(signal - baseline[None, :])
            huber = tf.where(residual <= 1.0, 0.5 * tf.square(residual), residual - 0.5)
            surrogate = surrogate - tf.reduce_mean(huber, axis=0)  # fits b(x, c); touches no other variable
        bound = tf.reduce_mean(draws.exact_log_weight, axis=0)  # draws without reparameterisation are exact
        kl, reconstruction = elbo_parts(draws)
        z_loc, z_scale = draws.summary(model, step)
        return BoundTerms(
            bound, kl, reconstruction, surrogate, z_loc, z_scale, signal=tf.reduce_mean(signal, 0)
        )

    def state_sums(self, terms: BoundTerms, weights: tf.Tensor) -> list[tf.Tensor]:
        """The batch's weighted sum of the learning signal and its weight (the running baseline's
        update); [] without a baseline."""
        if self.baseline == "none" or terms.signal is None:
            return []
        w = tf.cast(weights, tf.float32)
        return [masked_sum(terms.signal, w), tf.reduce_sum(w)]

    def fold_state_sums(self, sums: list[tf.Tensor]) -> None:
        """Fold the batch mean learning signal into the running baseline (bias-corrected EMA).

        Called by the trainer only for applied updates; a batch whose mean signal is not finite
        (a record with an infinite term) leaves the average as it was instead of poisoning it.
        """
        if not sums:
            return
        signal_sum, total = sums
        batch_mean = signal_sum / tf.maximum(total, 1.0)
        folds = tf.logical_and(total > 0, tf.math.is_finite(batch_mean))
        keep = tf.where(folds, self.decay, 1.0)
        contribution = tf.where(folds, (1.0 - keep) * batch_mean, 0.0)
        self.running_sum.assign(keep * self.running_sum + contribution)
        self.running_weight.assign(keep * self.running_weight + (1.0 - keep))

    def state(self) -> list[tf.Variable]:
        return [self.running_sum, self.running_weight]
