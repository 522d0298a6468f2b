"""The synchronous data-parallel step: N trainer workers, one model, one all-reduce per step.

Each worker trains on its own micro-batch of [x | c | weight] rows (its partitions' records). A
step is, on every worker at once:

1. forward and backward on the local rows (the trainer's compiled code, XLA where configured),
   giving the gradient of the *summed* loss ``-sum_i w_i s_i`` (``Estimator.summed_loss``), that
   sum and the local weight ``W_k = sum_i w_i`` (the real, non-padding, non-held-out records);
2. one all-reduce (SUM) of [gradients, loss sum, weight, the normaliser's batch sums, the
   estimator's running-state sums (a score-function baseline's)] over
   ``MultiWorkerMirroredStrategy``'s collectives (gRPC between workers, configured by
   ``TF_CONFIG`` or ``distribution.*``);
3. the gradient and loss of the union: both sums divided by ``max(sum_k W_k, 1)``, then the
   trainer's own clipping, non-finite guard, optimizer update and step count (compiled again).

The gradient is then ``sum_k W_k g_k / sum_k W_k`` with ``g_k`` worker k's mean gradient: the
records are weighted equally whichever worker holds them, so the update is the one a single process
makes on the union of the batches, and a worker with an empty (or all held-out) batch adds weight
0. Every worker applies the same reduced gradient to the same parameters (the chief's, broadcast by
:meth:`DistributedTrainer.sync_from_chief` at start), so they stay identical; the step counter and
the RNG are ordinary per-worker variables that advance identically because every worker takes part
in every step (an update is applied on all or none: the gate is computed from reduced values). The
online normaliser and a score-function baseline's running average fold the union's sums on every
worker, so they stay identical too (the normaliser's ``ready`` is part of that gate).

Draws. The step seed comes from the RNG, the same on every worker; worker k draws its latents with
that seed folded with k (:func:`~streamvi.training.trainer.block_seed`). A single process with
``Trainer(draw_blocks=N)`` and a batch of N x B rows draws block k the same way, so it reproduces an
N-worker step exactly (up to float rounding): the reference the tests compare against.

Why ordinary variables rather than ``MirroredVariable``: a mirrored variable is updated through
the strategy's ``merge_call``, which would have to sit inside the trainer's on-device ``tf.cond``
gate (skip a non-finite or empty step) and outside XLA. Keeping ordinary variables keeps the update
exactly the single-process one; the strategy carries the collective, which is all that crosses
workers. The same seed drawn by the same (compiled or not) kernels matters: see ``_local_part``.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from streamvi.cluster import Cluster
from streamvi.config import Settings
from streamvi.estimators import build_estimator
from streamvi.estimators.base import Estimator
from streamvi.model.vae import VAE, build_vae
from streamvi.training.trainer import StepResult, Trainer, block_seed, build_optimizer


def build_distributed_trainer(settings: Settings, strategy: tf.distribute.Strategy) -> DistributedTrainer:
    """The configured model, estimator and optimizer as one worker of ``strategy``'s cluster."""
    training = settings.training
    model = build_vae(
        settings.model, training, settings.input.dim, settings.input.context_dim, settings.input
    )
    return DistributedTrainer(
        model=model,
        estimator=build_estimator(settings),
        optimizer=build_optimizer(training),
        batch_size=training.batch_size,
        strategy=strategy,
        clip_grad_norm=training.clip_grad_norm,
        seed=training.seed,
        jit_compile=training.jit_compile,
        device=training.device,
        explain_top_k=settings.anomaly.explain_top_k,
    )


def build_strategy(cluster: Cluster) -> tf.distribute.MultiWorkerMirroredStrategy:
    """The collective strategy of ``cluster``, with ``collective_timeout_seconds`` on every
    collective. Must run before any other TensorFlow op of the process (collectives are configured
    at start); it waits until every worker's server is up."""
    task_type, task_id = _task(cluster)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({job: list(addresses) for job, addresses in cluster.jobs}),
        task_type=task_type,
        task_id=task_id,
        rpc_layer="grpc",
    )
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=cluster.collective_timeout_seconds
    )
    with _signal_handlers_kept():
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=options
        )


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Put the process's Python SIGTERM and SIGINT handlers back after the block.

    Starting the strategy starts TensorFlow's preemption notifier, which installs a C-level SIGTERM
    handler of its own in place of Python's: the daemon would then never see the SIGTERM that asks
    it to stop at a joint final checkpoint (and Kubernetes would kill it after its grace period)."""
    kept = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in kept.items():
                if handler is not None:
                    signal.signal(signum, handler)


def _task(cluster: Cluster) -> tuple[str, int]:
    """TensorFlow's (job, index) for this worker's position among all workers."""
    index = cluster.index
    for job, addresses in cluster.jobs:
        if index < len(addresses):
            return job, index
        index -= len(addresses)
    raise ValueError(f"worker index {cluster.index} is outside the cluster of {cluster.size}")


@dataclass(frozen=True)
class DistributedStepResult(StepResult):
    """A worker's step: its own records' scores and counts, and the records all workers trained."""

    union_trained_records: int = 0


class DistributedTrainer(Trainer):
    """A trainer whose every step is one synchronous all-reduced step of all workers."""

    def __init__(
        self,
        model: VAE,
        estimator: Estimator,
        optimizer: tf_keras.optimizers.Optimizer,
        batch_size: int,
        strategy: tf.distribute.Strategy,
        clip_grad_norm: float | None = None,
        seed: int = 0,
        jit_compile: bool = True,
        device: str | None = None,
        explain_top_k: int = 0,
    ) -> None:
        super().__init__(
            model,
            estimator,
            optimizer,
            batch_size,
            clip_grad_norm,
            seed,
            jit_compile,
            device,
            explain_top_k=explain_top_k,
        )
        if self._loss_scaled:
            raise ValueError("loss scaling (mixed_float16) is per worker: not supported in distributed steps")
        self.strategy = strategy
        self.workers = int(strategy.num_replicas_in_sync)
        self.worker_index = self._replica_id()
        self._local_fn = tf.function(self._local_part, jit_compile=jit_compile)
        self._finish_fn = tf.function(self._finish, jit_compile=jit_compile)
        self._train_fn = tf.function(self._train_step)  # the collective is not XLA-compiled

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0

    def _replica_id(self) -> int:
        def replica_id() -> Any:
            return tf.distribute.get_replica_context().replica_id_in_sync_group

        ids = self.strategy.experimental_local_results(self.strategy.run(replica_id))
        return int(ids[0])

    def all_reduce(self, values: list[tf.Tensor]) -> list[tf.Tensor]:
        """The SUM over all workers of each tensor of ``values`` (one batched collective); every
        worker must call it with tensors of the same shapes and dtypes, in the same order."""

        def reduce(*local: tf.Tensor) -> Any:
            # one batched collective per dtype: a batch packs its tensors into one buffer
            context = tf.distribute.get_replica_context()
            out: list[Any] = [None] * len(local)
            for dtype in dict.fromkeys(value.dtype for value in local):
                slots = [i for i, value in enumerate(local) if value.dtype == dtype]
                summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [local[i] for i in slots])
                for i, value in zip(slots, summed, strict=True):
                    out[i] = value
            return out

        # The collective's destination is the inputs' device: inside a tf.function, the outputs of
        # a nested (compiled) function have none until placed, so each is placed on this worker.
        with tf.device(self.strategy.extended.worker_devices[0]):
            placed = tuple(tf.identity(value) for value in values)
            reduced = self.strategy.run(reduce, args=placed)
        return [self.strategy.experimental_local_results(value)[0] for value in reduced]

    # -- compiled parts ------------------------------------------------------------------------------
    def _local_part(self, rows: tf.Tensor) -> tuple[Any, ...]:
        """Worker-local forward and backward: packed scores, summed loss, trained weight, trainable
        weight (before the training floor), the trained rows' sums for the running input statistics
        (the normaliser's) and for the estimator's running state (a baseline's; none without
        either), gradients.

        The step seed is drawn here, compiled like the single-process step draws it: the RNG's
        kernels compiled by XLA and run by TensorFlow need not give the same numbers."""
        x, c, trainable = self._split(rows)
        seed = block_seed(self._seed(), self.worker_index)
        terms, weights, summed, grads = self._gradients(x, c, trainable, seed, summed=True)
        total = tf.reduce_sum(tf.where(weights > 0, weights, tf.zeros_like(weights)))
        offered = tf.reduce_sum(tf.where(trainable > 0, trainable, tf.zeros_like(trainable)))
        input_sums = self.model.input_sums(x, weights > 0)
        state_sums = self.estimator.state_sums(terms, weights)
        return self._pack(terms, x, c, weights), summed, total, offered, input_sums, state_sums, grads

    def _train_step(self, rows: tf.Tensor) -> tf.Tensor:
        """Local gradients, one all-reduce, then the trainer's update on the union's gradient.
        Returns the packed scores and figures (as the trainer's step does) with one more row whose
        first entry is the union's trained weight."""
        packed, summed, total, offered, input_sums, state_sums, grads = self._local_fn(rows)
        reduced = self.all_reduce([summed, total, offered, *grads, *input_sums, *state_sums])
        union_total = reduced[1]
        denominator = tf.maximum(union_total, 1.0)
        loss = reduced[0] / denominator
        union_grads = [g / denominator for g in reduced[3 : 3 + len(grads)]]
        union_sums = reduced[3 + len(grads) : 3 + len(grads) + len(input_sums)]
        union_state = reduced[3 + len(grads) + len(input_sums) :]
        out = self._finish_fn(
            packed, loss, union_grads, union_total > 0, reduced[2] > 0, union_sums, union_state
        )
        extra = tf.pad(union_total[None, None], [[0, 0], [0, int(out.shape[1]) - 1]])
        return tf.concat([out, extra], axis=0)

    def _finish(
        self,
        packed: tf.Tensor,
        loss: tf.Tensor,
        grads: list[tf.Tensor],
        trains: tf.Tensor,
        counts: tf.Tensor,
        input_sums: list[tf.Tensor],
        state_sums: list[tf.Tensor],
    ) -> tf.Tensor:
        """The trainer's update on the union's gradient; the union's trained rows feed the running
        input statistics when the batch counts for them, and the estimator's running state (a
        baseline's average) when the update applies. Every worker folds the same sums, so both
        stay equal everywhere (and the normaliser's warm-up ends at the same step)."""

        def fold_state() -> None:
            self.estimator.fold_state_sums(state_sums)

        def fold_inputs(applies: tf.Tensor) -> None:
            gate = tf.cast(applies, tf.float64)
            self.model.fold_input_sums([part * gate for part in input_sums])

        return self._apply(
            packed, loss, grads, trains, fold_state=fold_state, fold_inputs=fold_inputs, counts=counts
        )

    # -- host API ------------------------------------------------------------------------------------
    def train_rows(self, rows: np.ndarray, n: int, floor: float = -np.inf) -> DistributedStepResult:
        """This worker's part of one step on the first ``n`` rows (0: an empty, zero-weight batch
        that still takes part). Blocks until every worker has submitted its part."""
        if rows.shape != (self.batch_size, self.row_width) or rows.dtype != np.float32:
            raise ValueError(
                f"batch rows must be float32 of shape {(self.batch_size, self.row_width)}, "
                f"got {rows.dtype} {rows.shape}"
            )
        if not 0 <= n <= self.batch_size:
            raise ValueError(f"batch must hold 0..{self.batch_size} real records, got {n}")
        rows = rows.copy()
        rows[n:, -1] = 0.0  # padding never carries weight
        self.set_training_floor(floor)
        started = time.perf_counter()
        with self._placement():
            out = self._train_fn(tf.constant(rows)).numpy()
        figures, union = out[self.batch_size], out[self.batch_size + 1]
        loss, grad_norm, learning_rate, finite = (float(v) for v in figures[:4])
        trainable = int(np.count_nonzero(rows[:n, -1]))
        trained = int(np.count_nonzero(out[:n, self._admitted_column] > 0.5))
        return DistributedStepResult(
            scores=self._unpack(out[: self.batch_size], n),
            step=int(figures[4]) + (int(figures[5]) << 24),
            loss=loss,
            grad_norm=grad_norm,
            learning_rate=learning_rate,
            duration_seconds=time.perf_counter() - started,
            trained_records=trained,
            applied=finite > 0.5,
            clipped=float(figures[6]) > 0.5,
            excluded_records=trainable - trained,
            model_ready=float(figures[7]) > 0.5,
            union_trained_records=round(float(union[0])),
        )

    def warm_up(self) -> float:
        """Trace and compile the step with an all-padding batch on every worker at once (the step
        is collective: all workers must warm up). Nothing is updated; the RNG is put back."""
        rows = np.zeros((self.batch_size, self.row_width), dtype=np.float32)
        started = time.perf_counter()
        with self._placement():
            rng_state = tf.identity(self.rng.state)
            self._train_fn(tf.constant(rows)).numpy()
            self.rng.reset(rng_state)
        return time.perf_counter() - started

    def state_variables(self) -> list[tf.Variable]:
        """Everything that must be equal on every worker: parameters, optimizer slots, running input
        statistics, step, RNG."""
        return [
            *self.trainable_variables,
            *self.optimizer.variables,
            *self.model.input_state(),
            *self.estimator.state(),
            self.step_counter,
            self.rng.state,
        ]

    def sync_from_chief(self) -> None:
        """Make every worker's state the chief's (after a build, or the chief's restore): a SUM
        all-reduce of the chief's values and everyone else's zeros. Integers travel as three
        exact 22-bit float64 pieces, so an RNG state's 64 bits survive."""
        variables = self.state_variables()
        parts: list[tf.Tensor] = []
        for variable in variables:
            value = variable if self.is_chief else tf.zeros_like(variable)
            parts.extend(_pieces(tf.convert_to_tensor(value)))
        reduced = iter(self.all_reduce(parts))
        for variable in variables:
            count = 3 if variable.dtype.is_integer else 1
            variable.assign(_joined([next(reduced) for _ in range(count)], variable.dtype))

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every worker's list of int64 ``values`` (any lengths), in worker order, on every worker:
        two SUM all-reduces (the lengths, then each worker's values in its own slots, the others
        zero), each integer as exact float64 pieces."""
        counts = np.zeros(self.workers, np.float64)
        counts[self.worker_index] = len(values)
        (lengths,) = self.all_reduce([tf.constant(counts)])
        sizes = [int(n) for n in lengths.numpy()]
        if not sum(sizes):  # the same on every worker: none goes on to the second collective
            return [[] for _ in sizes]
        slots = np.zeros(sum(sizes), np.int64)
        start = sum(sizes[: self.worker_index])
        slots[start : start + len(values)] = values
        pieces = self.all_reduce(_pieces(tf.constant(slots)))
        joined = _joined(pieces, tf.int64).numpy().tolist()
        bounds = np.cumsum([0, *sizes]).tolist()
        return [joined[bounds[k] : bounds[k + 1]] for k in range(self.workers)]

    def checksum(self) -> str:
        """SHA-256 of every worker-shared variable's bytes: equal on every worker after each step."""
        digest = hashlib.sha256()
        for variable in self.state_variables():
            digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
        return digest.hexdigest()


_PIECE = 2**22
_SHIFTS = (0, 22, 44)


def _pieces(value: tf.Tensor) -> list[tf.Tensor]:
    """A float value as itself; an integer as three float64 pieces of 22, 22 and 20 bits."""
    if not value.dtype.is_integer:
        return [value]
    bits = tf.bitcast(tf.cast(value, tf.int64), tf.uint64)
    mask = tf.constant(_PIECE - 1, tf.uint64)
    shifted = [tf.bitwise.right_shift(bits, tf.constant(shift, tf.uint64)) for shift in _SHIFTS]
    return [tf.cast(tf.bitwise.bitwise_and(part, mask), tf.float64) for part in shifted]


def _joined(pieces: list[tf.Tensor], dtype: tf.DType) -> tf.Tensor:
    if len(pieces) == 1:
        return tf.cast(pieces[0], dtype)
    bits = tf.zeros_like(tf.cast(pieces[0], tf.uint64))
    for piece, shift in zip(pieces, _SHIFTS, strict=True):
        shifted = tf.bitwise.left_shift(tf.cast(piece, tf.uint64), tf.constant(shift, tf.uint64))
        bits = tf.bitwise.bitwise_or(bits, shifted)
    return tf.cast(tf.bitcast(bits, tf.int64), dtype)
