"""The SGVI update: one compiled step per fixed-shape micro-batch, scoring before it updates.

The step is a ``tf.function`` (XLA-compiled where ``training.jit_compile`` is on) traced once for
the shape [batch_size, dim]; a partial batch is padded and its padding masked out of the loss.
Everything the step returns is packed into two tensors so one device-to-host copy carries a batch.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
import tf_keras

from streamvi.anomaly.explain import group_names, top_contributions
from streamvi.config import TrainingSettings
from streamvi.estimators.base import BoundTerms, Estimator, log_likelihood_estimate
from streamvi.model.vae import VAE
from streamvi.training.rehearsal import RehearsalWindow
from streamvi.training.results import BatchScores, StepResult


def build_optimizer(settings: TrainingSettings) -> tf_keras.optimizers.Optimizer:
    """The configured optimizer, wrapped for loss scaling under the float16 policy."""
    kinds: dict[str, Any] = {
        "adam": tf_keras.optimizers.Adam,
        "adamw": tf_keras.optimizers.AdamW,
        "rmsprop": tf_keras.optimizers.RMSprop,
        "sgd": tf_keras.optimizers.SGD,
    }
    optimizer = kinds[settings.optimizer](learning_rate=settings.learning_rate)
    if settings.mixed_precision == "mixed_float16":
        optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def block_seed(seed: tf.Tensor, block: int | tf.Tensor) -> tf.Tensor:
    """The stateless seed of block ``block`` of a step whose seed is ``seed``: worker k's batch in
    an N-worker step, or block k of a single-process reference step of N blocks."""
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(block, tf.int32))


def concat_terms(parts: list[BoundTerms]) -> BoundTerms:
    """The terms of consecutive blocks of a batch as the terms of the whole batch."""

    def joined(name: str) -> tf.Tensor | None:
        values = [getattr(part, name) for part in parts]
        return None if values[0] is None else tf.concat(values, axis=0)

    return BoundTerms(**{name: joined(name) for name in BoundTerms.__dataclass_fields__})


#: Figures of a step that follow its scores, in one extra row: loss, gradient norm, learning rate,
#: whether the update was finite, the step count's low and high 24 bits, whether it was clipped, and
#: whether the model that scored the batch was ready, and the rehearsal updates that applied.
_FIGURES = 9


class UpdateOutcome(NamedTuple):
    """What one guarded update did (tensors of the compiled step)."""

    grad_norm: tf.Tensor  # the model's gradient norm, before clipping
    clipped: tf.Tensor  # whether clipping changed the gradient
    finite: tf.Tensor  # whether the loss (and, without loss scaling, the gradient) was finite
    applied: tf.Tensor  # whether the update was applied
    ready: tf.Tensor  # whether the model was ready (its normaliser past the warm-up)


class Trainer:
    """Owns the model's update: optimizer, step counter and RNG, all of which a snapshot saves."""

    def __init__(
        self,
        model: VAE,
        estimator: Estimator,
        optimizer: tf_keras.optimizers.Optimizer,
        batch_size: int,
        clip_grad_norm: float | None = None,
        seed: int = 0,
        jit_compile: bool = True,
        device: str | None = None,
        draw_blocks: int = 1,
        explain_top_k: int = 0,
        rehearsal_window: int | None = None,
        rehearsal_steps: int = 1,
    ) -> None:
        if draw_blocks < 1 or batch_size % draw_blocks:
            raise ValueError(f"draw_blocks must divide batch_size {batch_size}, got {draw_blocks}")
        if rehearsal_window is not None and rehearsal_window < batch_size:
            raise ValueError(
                f"the rehearsal window ({rehearsal_window} records) must hold a batch ({batch_size})"
            )
        if rehearsal_steps < 1:
            raise ValueError(f"rehearsal_steps must be at least 1, got {rehearsal_steps}")
        self.model = model
        #: Equal blocks of a batch whose latent draws are seeded apart (see ``_terms``).
        self.draw_blocks = draw_blocks
        self.estimator = estimator
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.clip_grad_norm = clip_grad_norm
        self.device = device
        self.jit_compile = jit_compile
        #: Per record, the input groups (dimensions or features) with the lowest log-likelihood
        #: that each score's columns carry (streamvi/anomaly/explain.py); 0 for none.
        self.explain_top_k = explain_top_k
        #: The names of the input groups an explanation ranks (features, or x[i]), when explaining.
        self.explain_names = group_names(model) if explain_top_k else []
        #: Columns of the explanation (indices, then values): k clipped to the groups there are.
        self.explain_width = 2 * min(explain_top_k, len(self.explain_names))
        self._loss_scaled = isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
        with self._placement():
            self.step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.rng = tf.random.Generator.from_seed(seed)
            #: Rows whose prequential bound is below this ELBO are not trained on (flagged
            #: anomalies, streamvi/anomaly/monitor.py); -inf trains on every trainable row. Set by
            #: ``train_rows`` on the step thread; not part of a snapshot.
            self.training_floor = tf.Variable(-np.inf, dtype=tf.float32, trainable=False, name="floor")
            self.optimizer.build(self.trainable_variables)
            #: The last trained rows that each training step rehearses ``rehearsal_steps`` times
            #: (streamvi/training/rehearsal.py); None: one update per step.
            self.rehearsal = (
                RehearsalWindow(rehearsal_window, self.row_width) if rehearsal_window is not None else None
            )
        self.rehearsal_steps = rehearsal_steps
        self._floor_value = -np.inf
        self._train_fn = tf.function(self._train_step, jit_compile=jit_compile)
        self._eval_fn = tf.function(self._eval_step, jit_compile=jit_compile)
        self._score_fn = tf.function(self._score_step, jit_compile=jit_compile)
        self._loglik_fns: dict[int, Any] = {}

    @classmethod
    def from_settings(
        cls,
        model: VAE,
        estimator: Estimator,
        settings: TrainingSettings,
        draw_blocks: int = 1,
        explain_top_k: int = 0,
    ) -> Trainer:
        return cls(
            model=model,
            estimator=estimator,
            optimizer=build_optimizer(settings),
            batch_size=settings.batch_size,
            clip_grad_norm=settings.clip_grad_norm,
            seed=settings.seed,
            jit_compile=settings.jit_compile,
            device=settings.device,
            draw_blocks=draw_blocks,
            explain_top_k=explain_top_k,
            rehearsal_window=settings.rehearsal_window_records,
            rehearsal_steps=settings.rehearsal_steps,
        )

    def _placement(self) -> Any:
        return tf.device(self.device) if self.device else contextlib.nullcontext()

    @property
    def trainable_variables(self) -> list[tf.Variable]:
        """The model's variables and the estimator's own (a learned baseline), in a fixed order."""
        return list(self.model.trainable_variables) + list(self.estimator.trainable_variables)

    def checkpoint_objects(self) -> dict[str, Any]:
        """Everything the snapshot must hold to resume this trainer bit for bit."""
        objects = {
            "model": self.model,
            "estimator": self.estimator,
            "optimizer": self.optimizer,
            "step": self.step_counter,
            "rng": self.rng,
        }
        if self.rehearsal is not None:
            objects["rehearsal"] = self.rehearsal
        return objects

    @property
    def step(self) -> int:
        return int(self.step_counter.numpy())

    @property
    def summary_size(self) -> int:
        return self.model.latent.summary_size

    @property
    def context_dim(self) -> int:
        return self.model.context_dim

    # -- compiled bodies ---------------------------------------------------------------------------
    def _pack(
        self, terms: BoundTerms, x: tf.Tensor, c: tf.Tensor, admitted: tf.Tensor | None = None
    ) -> tf.Tensor:
        """Per-record columns: bound, KL, reconstruction, the latent summary, then the explanation
        (with ``explain_top_k``) and, for a training step, whether the row was trained on."""
        columns = [
            terms.bound[:, None],
            terms.kl[:, None],
            terms.reconstruction[:, None],
            tf.cast(terms.z_loc, tf.float32),
            tf.cast(terms.z_scale, tf.float32),
        ]
        if self.explain_top_k:
            groups = self.model.dimension_log_likelihood(x, c)
            indices, values = top_contributions(groups, self.explain_top_k)
            columns += [tf.cast(indices, tf.float32), tf.cast(values, tf.float32)]
        if admitted is not None:
            columns.append(tf.cast(admitted > 0, tf.float32)[:, None])
        return tf.concat(columns, axis=1)

    def _admitted(self, weights: tf.Tensor, bound: tf.Tensor) -> tf.Tensor:
        """The weights without the rows whose bound is below ``training_floor`` (flagged anomalies
        that are not trained on): decided on the device, from the scores of this very pass."""
        keep = tf.stop_gradient(tf.cast(bound, tf.float32)) >= self.training_floor
        return tf.where(keep, weights, tf.zeros_like(weights))

    def _seed(self) -> tf.Tensor:
        return tf.cast(self.rng.make_seeds(1)[:, 0], tf.int32)

    def _split(self, rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """The x, c and weight columns of [x | c | weight] rows."""
        dim, context = self.model.input_dim, self.context_dim
        return rows[:, :dim], rows[:, dim : dim + context], rows[:, dim + context]

    def _terms(self, x: tf.Tensor, c: tf.Tensor, seed: tf.Tensor) -> BoundTerms:
        """The estimator's per-record terms. With ``draw_blocks`` N > 1 the batch is N equal blocks
        whose draws come from the step seed folded with the block's index, as N workers' batches do
        (streamvi/training/distributed.py); with 1, the step seed itself."""
        if self.draw_blocks == 1:
            return self.estimator.terms(self.model, x, c, seed, self.step_counter)
        size = self.batch_size // self.draw_blocks
        return concat_terms(
            [
                self.estimator.terms(
                    self.model,
                    x[k * size : (k + 1) * size],
                    c[k * size : (k + 1) * size],
                    block_seed(seed, k),
                    self.step_counter,
                )
                for k in range(self.draw_blocks)
            ]
        )

    def _gradients(
        self, x: tf.Tensor, c: tf.Tensor, weights: tf.Tensor, seed: tf.Tensor, summed: bool = False
    ) -> tuple[BoundTerms, tf.Tensor, tf.Tensor, list[tf.Tensor]]:
        """The terms, the weights of the rows trained on (``weights`` without those below the
        training floor), the loss and its (unscaled) gradient for every trainable variable (zeros
        where a variable has none). ``summed``: the loss is summed over the weighted rows rather
        than averaged, the form whose gradients add up across workers."""
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            terms = self._terms(x, c, seed)
            weights = self._admitted(weights, terms.bound)
            loss = (self.estimator.summed_loss if summed else self.estimator.loss)(terms, weights)
            scaled = self.optimizer.get_scaled_loss(loss) if self._loss_scaled else loss
        grads = tape.gradient(scaled, variables)
        if self._loss_scaled:
            grads = self.optimizer.get_unscaled_gradients(grads)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)]
        return terms, weights, loss, grads

    def _train_step(self, rows: tf.Tensor) -> tf.Tensor:
        """One update from the [x | c | weight] rows (and its rehearsal, with a window); returns
        the per-record scores with one more row for the step's figures, so one copy goes in and
        one comes out."""
        x, c, trainable = self._split(rows)
        terms, weights, loss, grads = self._gradients(x, c, trainable, self._seed())

        def fold_state() -> None:
            self.estimator.update_state(terms, weights)

        def fold_inputs(applies: tf.Tensor) -> None:
            self.model.fold(x, tf.logical_and(weights > 0, applies))

        rehearse = (
            None
            if self.rehearsal is None
            else functools.partial(self._add_and_rehearse, self.rehearsal, rows, weights)
        )
        return self._apply(
            self._pack(terms, x, c, weights),
            loss,
            grads,
            tf.reduce_any(weights > 0),
            fold_state,
            fold_inputs,
            counts=tf.reduce_any(trainable > 0),
            rehearse=rehearse,
        )

    def _update(
        self, loss: tf.Tensor, grads: list[tf.Tensor], trains: tf.Tensor, fold_state: Callable[[], None]
    ) -> UpdateOutcome:
        """Clip ``grads`` and apply them when ``trains``, the model is ready and they are finite."""
        variables = self.trainable_variables
        grads, grad_norm, clipped = self._clip_model_gradients(grads)
        # A non-finite loss or gradient (a global norm is non-finite iff any entry is) skips the
        # update on the device, with no host round-trip. Under loss scaling, overflowing gradients
        # are the LossScaleOptimizer's to skip (it lowers the scale), so only the loss is checked.
        # While the normaliser warms up (``ready`` false) the parameters stay.
        ready = self.model.ready()
        finite = tf.math.is_finite(loss)
        if not self._loss_scaled:
            finite = tf.logical_and(finite, tf.math.is_finite(tf.linalg.global_norm(grads)))

        def apply() -> tf.Tensor:
            self.optimizer.apply_gradients(zip(grads, variables, strict=True))
            # the estimator's running state (a baseline's average) follows applied updates only
            fold_state()
            return tf.constant(True)

        gate = tf.logical_and(trains if self._loss_scaled else tf.logical_and(trains, finite), ready)
        tf.cond(gate, apply, lambda: tf.constant(False))
        return UpdateOutcome(grad_norm, clipped, finite, gate, ready)

    def _add_and_rehearse(
        self,
        window: RehearsalWindow,
        rows: tf.Tensor,
        weights: tf.Tensor,
        finite: tf.Tensor,
        applied: tf.Tensor,
    ) -> tf.Tensor:
        """The step's trained rows join ``window``, after their own scores were taken; then, if the
        step's update applied, the rehearsal updates. Returns how many of those applied."""
        window.add(rows, tf.logical_and(weights > 0, finite))
        return tf.cond(applied, lambda: self._rehearse(window), lambda: tf.constant(0, tf.int32))

    def _rehearse(self, window: RehearsalWindow) -> tf.Tensor:
        """``rehearsal_steps`` further updates, each on a batch drawn from ``window`` (every drawn
        row trained on, unless it is now below the training floor); returns how many applied.
        They neither count as steps nor feed the running input statistics."""

        def update(done: tf.Tensor, applied: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            drawn = window.draw(self.batch_size, self._seed())
            x, c, _ = self._split(drawn)
            ones = tf.ones([self.batch_size], tf.float32)
            terms, weights, loss, grads = self._gradients(x, c, ones, self._seed())

            def fold_state() -> None:
                self.estimator.update_state(terms, weights)

            outcome = self._update(loss, grads, tf.reduce_any(weights > 0), fold_state)
            return done + 1, applied + tf.cast(outcome.applied, tf.int32)

        zero = tf.constant(0, tf.int32)
        _, applied = tf.while_loop(lambda done, _: done < self.rehearsal_steps, update, (zero, zero))
        return applied

    def _apply(
        self,
        packed: tf.Tensor,
        loss: tf.Tensor,
        grads: list[tf.Tensor],
        trains: tf.Tensor,
        fold_state: Callable[[], None] = lambda: None,
        fold_inputs: Callable[[tf.Tensor], None] = lambda applies: None,
        counts: tf.Tensor | None = None,
        rehearse: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None,
    ) -> tf.Tensor:
        """Clip and apply ``grads`` when ``trains`` and they are finite, count the step, and return
        the ``packed`` scores with the step's figures as one more row. ``trains``: whether any row
        (of any worker) is trained; ``counts``: whether the step counts (any row was trainable,
        even if every one was below the training floor; default ``trains``); ``fold_state`` runs
        with an applied update; ``fold_inputs`` feeds the running input statistics, told whether
        the batch counts for them; ``rehearse``, told whether the update was finite and whether it
        applied, makes the rehearsal updates after it and returns how many applied. A batch with
        no trainable row (the warm-up's) changes no state at all."""
        grad_norm, clipped, finite, gate, ready = self._update(loss, grads, trains, fold_state)
        # the running input statistics follow the trained rows of batches whose update applies
        # (or that only feed the warm-up), after the scores above were computed with the old ones
        fold_inputs(tf.logical_or(finite, ~ready))
        step = self.step_counter.assign_add(tf.cast(trains if counts is None else counts, tf.int64))
        rehearsed = tf.constant(0, tf.int32) if rehearse is None else rehearse(finite, gate)
        # The step count travels as two float32 halves of 24 bits each, exact up to 2**48 steps.
        figures = [
            loss,
            grad_norm,
            self.optimizer.learning_rate,
            finite,
            step % 2**24,
            step // 2**24,
            tf.logical_and(clipped, gate),
            ready,  # what the batch was scored with: the normaliser's warm-up was over
            rehearsed,
        ]
        figures_row = tf.stack([tf.cast(v, tf.float32) for v in figures])[None, :]
        width = max(int(packed.shape[1]), _FIGURES)
        return tf.concat(
            [
                tf.pad(packed, [[0, 0], [0, width - int(packed.shape[1])]]),
                tf.pad(figures_row, [[0, 0], [0, width - _FIGURES]]),
            ],
            axis=0,
        )

    def _clip_model_gradients(self, grads: list[tf.Tensor]) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
        """Clip the model's gradients to ``clip_grad_norm`` by their global norm; the estimator's
        own (a learned baseline's) are left alone. Returns the gradients, the model's norm before
        clipping and whether clipping changed them."""
        count = len(self.model.trainable_variables)
        model_grads, own_grads = grads[:count], grads[count:]
        grad_norm = tf.linalg.global_norm(model_grads)
        if self.clip_grad_norm is None:
            return grads, grad_norm, tf.constant(False)
        clipped_grads, _ = tf.clip_by_global_norm(model_grads, self.clip_grad_norm, use_norm=grad_norm)
        return clipped_grads + own_grads, grad_norm, grad_norm > self.clip_grad_norm

    def _eval_step(self, x: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
        return self._pack(self.estimator.terms(self.model, x, c, self._seed(), self.step_counter), x, c)

    def _score_step(self, x: tf.Tensor, c: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``_eval_step``, and the step counter and whether the model is ready as one int64 pair: a
        batch that trains nothing (an encoder replica's) costs one copy out beside its scores."""
        state = tf.stack([self.step_counter.read_value(), tf.cast(self.model.ready(), tf.int64)])
        return self._eval_step(x, c), state

    # -- host API ----------------------------------------------------------------------------------
    # The steps as concrete functions of their one batch shape. Calling one skips ``tf.function``'s
    # per-call argument matching (tens of us of Python under the GIL, which the loop's thread wants
    # at the same time); it is the same trace. The warm-ups trace through them too: a trace made by
    # a call counts towards TensorFlow's frequent-retracing warning, which a replica loading one
    # trainer per snapshot would set off.
    @functools.cached_property
    def _train_concrete(self) -> Any:
        return self._train_fn.get_concrete_function(
            tf.TensorSpec((self.batch_size, self.row_width), tf.float32)
        )

    @functools.cached_property
    def _score_concrete(self) -> Any:
        return self._score_fn.get_concrete_function(
            tf.TensorSpec((self.batch_size, self.model.input_dim), tf.float32),
            tf.TensorSpec((self.batch_size, self.context_dim), tf.float32),
        )

    def _context(self, c: np.ndarray | None, rows: int) -> np.ndarray:
        if c is None:
            if self.context_dim:
                raise ValueError(f"this model needs a context of {self.context_dim} values per record")
            return np.zeros((rows, 0), dtype=np.float32)
        return np.asarray(c, dtype=np.float32)

    def train(
        self, x: np.ndarray, n: int, c: np.ndarray | None = None, weights: np.ndarray | None = None
    ) -> StepResult:
        """One update on the first ``n`` rows of ``x`` [batch_size, dim]; rows past ``n`` are padding.

        ``weights`` [batch_size] marks the rows that are trained on (1) or only scored (0, e.g. held
        out); by default the ``n`` real rows. The returned scores come from the forward pass that
        produced the gradient, i.e. from the parameters *before* this update: a prequential
        (score-then-train) evaluation. A batch with no trainable row is scored without an update.
        """
        self._check_shape(x, n)
        rows = np.empty((self.batch_size, self.row_width), dtype=np.float32)
        rows[:, : x.shape[1]] = x
        rows[:, x.shape[1] : -1] = self._context(c, x.shape[0])
        rows[:, -1] = (np.arange(self.batch_size) < n) if weights is None else weights
        return self.train_rows(rows, n)

    @property
    def row_width(self) -> int:
        """Columns of a batch as ``train_rows`` takes it: x, then the context, then the weight."""
        return self.model.input_dim + self.context_dim + 1

    def set_training_floor(self, floor: float) -> None:
        """Rows whose prequential bound is below ``floor`` are left out of the following steps'
        updates (-inf: none). Call it on the step thread, between steps."""
        if floor != self._floor_value:
            with self._placement():
                self.training_floor.assign(floor)
            self._floor_value = floor

    def train_rows(self, rows: np.ndarray, n: int, floor: float = -np.inf) -> StepResult:
        """``train`` on a batch already laid out as [x | c | weight] rows (the micro-batcher's
        buffer): one host-to-device copy in, one device-to-host copy out. Rows whose bound (from
        this step's own forward pass) is below ``floor`` are scored but not trained on."""
        if rows.shape != (self.batch_size, self.row_width) or rows.dtype != np.float32:
            raise ValueError(
                f"batch rows must be float32 of shape {(self.batch_size, self.row_width)}, "
                f"got {rows.dtype} {rows.shape}"
            )
        if not 0 < n <= self.batch_size:
            raise ValueError(f"batch must hold 1..{self.batch_size} real records, got {n}")
        trainable = int(np.count_nonzero(rows[:n, -1]))
        self.set_training_floor(floor)
        started = time.perf_counter()
        # Every call into TensorFlow releases the GIL and must win it back from the loop's thread,
        # so the step makes as few as it can: one copy in, the step, one copy out.
        with self._placement():
            if trainable == 0:
                x, c = rows[:, : self.model.input_dim], rows[:, self.model.input_dim : -1]
                scores, state = self._score_concrete(tf.constant(x), tf.constant(c))
                packed = scores.numpy()
                step, ready = (int(v) for v in state.numpy())
                model_ready = ready == 1
                loss, grad_norm, learning_rate, finite = np.nan, 0.0, np.nan, 1.0
                clipped = 0.0
                rehearsed = 0
                trained = 0
            else:
                out = self._train_concrete(tf.constant(rows)).numpy()
                packed, figures = out[: self.batch_size], out[self.batch_size]
                loss, grad_norm, learning_rate, finite = (float(v) for v in figures[:4])
                step = int(figures[4]) + (int(figures[5]) << 24)
                clipped = float(figures[6])
                model_ready = float(figures[7]) > 0.5
                rehearsed = int(figures[8])
                trained = int(np.count_nonzero(packed[:n, self._admitted_column] > 0.5))
        return StepResult(
            scores=self._unpack(packed, n),
            step=step,
            loss=loss,
            grad_norm=grad_norm,
            learning_rate=learning_rate,
            duration_seconds=time.perf_counter() - started,
            trained_records=trained,
            applied=finite > 0.5,
            clipped=clipped > 0.5,
            counted=trainable > 0,
            excluded_records=trainable - trained,
            model_ready=model_ready,
            rehearsal_updates=rehearsed,
        )

    @property
    def _admitted_column(self) -> int:
        """The score column that says whether a row was trained on (training steps only)."""
        return 3 + 2 * self.summary_size + self.explain_width

    def _unpack(self, packed: np.ndarray, n: int) -> BatchScores:
        return BatchScores.unpack(packed, n, self.summary_size, self.explain_width // 2)

    def warm_up(self) -> float:
        """Trace and compile the training step on an all-padding batch; return the seconds it took.

        With no trainable row the step updates nothing and does not count, and the RNG is put back,
        so a warmed-up trainer continues exactly as a cold one would. The daemon runs this while its
        consumer joins the group, so the compile is off the path to the first trained batch.
        """
        rows = np.zeros((self.batch_size, self.row_width), dtype=np.float32)
        started = time.perf_counter()
        with self._placement():
            rng_state = tf.identity(self.rng.state)
            self._train_concrete(tf.constant(rows)).numpy()
            self.rng.reset(rng_state)
        return time.perf_counter() - started

    def warm_up_scoring(self) -> None:
        """Trace and compile the step that scores a batch without training (``train_rows`` with no
        trainable row) on an all-padding batch; it draws from the RNG as scoring a batch does."""
        x = np.zeros((self.batch_size, self.model.input_dim), dtype=np.float32)
        c = np.zeros((self.batch_size, self.context_dim), dtype=np.float32)
        with self._placement():
            self._score_concrete(tf.constant(x), tf.constant(c))[0].numpy()

    def _chunks(self, x: np.ndarray, c: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """Fixed-shape padded chunks of any number of rows, so evaluation never retraces."""
        x = np.asarray(x, dtype=np.float32)
        c = self._context(c, x.shape[0])
        x_buffer = np.zeros((self.batch_size, x.shape[1]), dtype=np.float32)
        c_buffer = np.zeros((self.batch_size, c.shape[1]), dtype=np.float32)
        for start in range(0, x.shape[0], self.batch_size):
            part = x[start : start + self.batch_size]
            rows = part.shape[0]
            x_buffer[:rows] = part
            x_buffer[rows:] = 0.0
            c_buffer[:rows] = c[start : start + rows]
            c_buffer[rows:] = 0.0
            yield x_buffer, c_buffer, rows

    def evaluate(self, x: np.ndarray, c: np.ndarray | None = None) -> BatchScores:
        """Scores for any number of rows without updating."""
        chunks = []
        for x_chunk, c_chunk, rows in self._chunks(x, c):
            with self._placement():
                chunks.append(self._eval_fn(tf.constant(x_chunk), tf.constant(c_chunk)).numpy()[:rows])
        width = 3 + 2 * self.summary_size + self.explain_width
        packed = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
        return self._unpack(packed, packed.shape[0])

    def log_likelihood(self, x: np.ndarray, c: np.ndarray | None = None, samples: int = 64) -> np.ndarray:
        """Importance-weighted estimate of log p(x) per row with ``samples`` draws (IWAE-k), no update."""
        if samples not in self._loglik_fns:

            def estimate(x_chunk: tf.Tensor, c_chunk: tf.Tensor) -> tf.Tensor:
                return log_likelihood_estimate(
                    self.model, x_chunk, c_chunk, samples, self._seed(), self.step_counter
                )

            self._loglik_fns[samples] = tf.function(estimate, jit_compile=self.jit_compile)
        fn = self._loglik_fns[samples]
        out = []
        for x_chunk, c_chunk, rows in self._chunks(x, c):
            with self._placement():
                out.append(fn(tf.constant(x_chunk), tf.constant(c_chunk)).numpy()[:rows])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def _check_shape(self, x: np.ndarray, n: int) -> None:
        if x.shape != (self.batch_size, self.model.input_dim) or x.dtype != np.float32:
            raise ValueError(
                f"batch must be float32 of shape {(self.batch_size, self.model.input_dim)}, "
                f"got {x.dtype} {x.shape}"
            )
        if not 0 < n <= self.batch_size:
            raise ValueError(f"batch must hold 1..{self.batch_size} real records, got {n}")
