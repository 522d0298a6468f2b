"""The online loop: decode, micro-batch, score-then-train, publish, and checkpoint in a fixed order.

Checkpoint commit order (the contract downstream users and restarts rely on):

    1. the open micro-batch is trained and its latents queued (nothing consumed is left pending);
    2. outputs flushed    -- every latent, metric and dead letter so far is acknowledged by the broker;
    3. snapshot durable   -- model, optimizer, step, RNG and next offsets are fsynced and renamed;
    4. offsets committed  -- the consumer group moves to the same offsets the snapshot holds.

A crash between any two steps loses nothing: on restart the newest valid snapshot is restored and
consumption resumes at *its* offsets, so no record is skipped and none is trained on twice; outputs
of records after the snapshot may be published again (at-least-once output).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from streamvi.io.base import OutputSink, Partition, RawRecord, RecordSource
from streamvi.io.codecs import (
    DecodeError,
    RecordDecoder,
    dead_letter_message,
    latent_messages,
    metrics_message,
)
from streamvi.metrics import Health, Metrics
from streamvi.snapshots.store import SnapshotInfo, SnapshotStore, encode_offsets
from streamvi.training.batching import MicroBatcher
from streamvi.training.heldout import HeldOutReservoir
from streamvi.training.history import StepHistory
from streamvi.training.trainer import StepResult, Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputTopics:
    latents: str
    metrics: str
    dead_letter: str


@dataclass
class LoopCounts:
    """Running totals, saved in every snapshot and restored with it."""

    records_consumed: int = 0
    records_trained: int = 0
    dead_letters: int = 0
    latents_published: int = 0
    steps: int = 0
    snapshots: int = 0

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> LoopCounts:
        known = {k: int(v) for k, v in meta.get("counts", {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class CheckpointPolicy:
    every_steps: int
    every_seconds: float


@dataclass
class EvaluationPolicy:
    """Held-out evaluation: every ``every_steps`` steps, ELBO and IWAE-k log-likelihood on the reservoir."""

    reservoir: HeldOutReservoir
    every_steps: int
    importance_samples: int


@dataclass
class LoopState:
    """What the loop has consumed: next offset per partition and the last step's summary."""

    next_offsets: dict[Partition, int] = field(default_factory=dict)
    last_summary: dict[str, float] = field(default_factory=dict)
    last_heldout: dict[str, Any] = field(default_factory=dict)


class OnlineLoop:
    """Runs SGVI on a record stream; Kafka-free (it sees only RecordSource and OutputSink)."""

    def __init__(
        self,
        *,
        source: RecordSource,
        sink: OutputSink,
        decoder: RecordDecoder,
        trainer: Trainer,
        store: SnapshotStore,
        topics: OutputTopics,
        policy: CheckpointPolicy,
        max_batch_latency_seconds: float,
        metrics: Metrics | None = None,
        health: Health | None = None,
        snapshot_meta: Mapping[str, Any] | None = None,
        max_poll_records: int = 1000,
        lag_interval_seconds: float = 5.0,
        evaluation: EvaluationPolicy | None = None,
    ) -> None:
        self.source = source
        self.sink = sink
        self.decoder = decoder
        self.trainer = trainer
        self.store = store
        self.topics = topics
        self.policy = policy
        self.metrics = metrics
        self.health = health or Health()
        self.snapshot_meta = dict(snapshot_meta or {})
        self.max_poll_records = max_poll_records
        self.lag_interval_seconds = lag_interval_seconds
        self.evaluation = evaluation
        self.batcher = MicroBatcher(
            trainer.batch_size, decoder.dim, max_batch_latency_seconds, context_dim=decoder.context_dim
        )
        self.checkpoint = tf.train.Checkpoint(**trainer.checkpoint_objects())
        self.counts = LoopCounts()
        self.state = LoopState()
        self.history = StepHistory()
        self._last_checkpoint_time = time.monotonic()
        self._last_checkpoint_step = trainer.step
        self._last_checkpoint_offsets: dict[Partition, int] = {}
        self._last_lag_time = 0.0
        source.set_rebalance_callbacks(self._on_assigned, self._on_revoked)

    # -- start-up ----------------------------------------------------------------------------------
    def restore(self) -> SnapshotInfo | None:
        """Load the newest valid snapshot (if any) and make the source resume at its offsets."""
        info = self.store.latest()
        if info is not None:
            self.store.restore(self.checkpoint, info)
            self.counts = LoopCounts.from_meta(info.meta)
            self.state.next_offsets = dict(info.offsets)
            self.state.last_summary = dict(info.meta.get("metrics", {}))
            self.history = StepHistory.from_meta(info.meta)
            self.source.set_start_offsets(info.offsets)
            log.info("restored snapshot %s at step %d, offsets %s", info.path.name, info.step, info.offsets)
        self._last_checkpoint_step = self.trainer.step
        self._last_checkpoint_offsets = dict(self.state.next_offsets)
        self.health.set(model_loaded=True)
        if self.metrics is not None:
            self.metrics.model_step.set(self.trainer.step)
        return info

    # -- rebalance hooks (called from inside source.poll on this thread) ---------------------------
    def _on_assigned(self, partitions: Sequence[Partition]) -> None:
        self.health.set(partitions_assigned=bool(self.source.assignment()) or bool(partitions))

    def _on_revoked(self, partitions: Sequence[Partition]) -> None:
        if partitions:
            self.run_checkpoint(reason="rebalance")
            for partition in partitions:
                self.state.next_offsets.pop(partition, None)
                self._last_checkpoint_offsets.pop(partition, None)
        self.health.set(partitions_assigned=False)

    # -- the loop ----------------------------------------------------------------------------------
    def run(
        self,
        stop: threading.Event | None = None,
        max_records: int | None = None,
        idle_timeout_seconds: float | None = None,
    ) -> LoopCounts:
        """Consume until ``stop`` is set, ``max_records`` are consumed, or the stream is idle that long.

        A clean stop always ends with a full checkpoint, so a restart replays nothing.
        """
        stop = stop or threading.Event()
        consumed_here = 0
        last_record_time = time.monotonic()
        while not stop.is_set():
            if max_records is not None and consumed_here >= max_records:
                break
            wait = self.batcher.time_left()
            timeout = 0.2 if wait is None else min(0.2, wait)
            budget = self.max_poll_records
            if max_records is not None:
                budget = min(budget, max_records - consumed_here)
            records = self.source.poll(timeout, budget)
            now = time.monotonic()
            if records:
                last_record_time = now
                consumed_here += len(records)
                self._handle(records)
            elif idle_timeout_seconds is not None and now - last_record_time >= idle_timeout_seconds:
                log.info("no input for %.1fs; stopping", idle_timeout_seconds)
                break
            if self.batcher.due():
                self._train_batch()
            if self._checkpoint_due():
                self.run_checkpoint(reason="interval")
            if now - self._last_lag_time >= self.lag_interval_seconds:
                self._update_lag()
                self._last_lag_time = now
        self.run_checkpoint(reason="shutdown")
        self._update_lag()
        return self.counts

    def _handle(self, records: list[RawRecord]) -> None:
        if self.metrics is not None:
            self.metrics.records_consumed.inc(len(records))
        self.counts.records_consumed += len(records)
        offsets = self.state.next_offsets
        for record in records:
            # The record counts as consumed once handed to the batcher or the dead-letter sink; a
            # checkpoint always drains the batcher first, so the offset never runs ahead of training.
            offsets[(record.topic, record.partition)] = record.offset + 1
            try:
                decoded = self.decoder.decode(record)
            except DecodeError as error:
                self._dead_letter(record, error)
                continue
            heldout = self.evaluation is not None and self.evaluation.reservoir.selects(record)
            if heldout and self.evaluation is not None:
                self.evaluation.reservoir.add(decoded.x, decoded.c)
            self.batcher.add(record, decoded.x, decoded.record_id, decoded.c, train=not heldout)
            if self.batcher.full:
                self._train_batch()
                if self._checkpoint_due():
                    self.run_checkpoint(reason="interval")

    def _dead_letter(self, record: RawRecord, error: DecodeError) -> None:
        log.debug("dead letter %s:%d@%d: %s", record.topic, record.partition, record.offset, error)
        self.sink.send(dead_letter_message(record, self.topics.dead_letter, error))
        self.counts.dead_letters += 1
        if self.metrics is not None:
            self.metrics.dead_letters.labels(reason=error.reason).inc()

    def _train_batch(self) -> None:
        n = len(self.batcher)
        if n == 0:
            return
        x, c, weights = self.batcher.padded()
        result = self.trainer.train(x, n, c, weights)
        scores = result.scores
        self.sink.send_many(
            latent_messages(
                self.topics.latents,
                self.batcher.records,
                self.batcher.record_ids,
                scores.z_loc,
                scores.z_scale,
                scores.bound,
                result.step - 1 if result.trained else result.step,  # the parameters that scored it
                self.trainer.estimator.bound_name,
            )
        )
        self.batcher.clear()
        self.counts.records_trained += result.trained_records
        self.counts.latents_published += n
        if self.metrics is not None:
            self.metrics.latents_published.inc(n)
        if not result.trained:
            return
        self.counts.steps += 1
        summary = result.summary()
        self.state.last_summary = summary
        self.history.add(result.step, summary)
        self.sink.send(metrics_message(self.topics.metrics, self._step_payload(result, summary)))
        self._record_step_metrics(result, summary)
        if self.evaluation is not None and result.step % self.evaluation.every_steps == 0:
            self._evaluate_heldout(result.step)

    def _evaluate_heldout(self, step: int) -> None:
        """Held-out ELBO and importance-weighted log-likelihood on the reservoir (no update)."""
        assert self.evaluation is not None
        x, c = self.evaluation.reservoir.contents()
        if x.shape[0] == 0:
            return
        elbo = float(np.mean(self.trainer.evaluate(x, c).bound))
        k = self.evaluation.importance_samples
        log_likelihood = float(np.mean(self.trainer.log_likelihood(x, c, k)))
        payload = {
            "kind": "heldout",
            "step": step,
            "records": int(x.shape[0]),
            "bound": self.trainer.estimator.bound_name,
            "elbo": elbo,
            "log_likelihood": log_likelihood,
            "importance_samples": k,
            "wall_time": time.time(),
        }
        self.state.last_heldout = payload
        self.sink.send(metrics_message(self.topics.metrics, payload))
        if self.metrics is not None:
            self.metrics.heldout_elbo.set(elbo)
            self.metrics.heldout_log_likelihood.set(log_likelihood)
            self.metrics.heldout_records.set(x.shape[0])

    def _step_payload(self, result: StepResult, summary: dict[str, float]) -> dict[str, Any]:
        return {
            "kind": "step",
            "step": result.step,
            "records": result.scores.size,
            "trained_records": result.trained_records,
            "estimator": self.trainer.estimator.name,
            "bound": self.trainer.estimator.bound_name,
            **summary,
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "learning_rate": result.learning_rate,
            "step_seconds": result.duration_seconds,
            "wall_time": time.time(),
            "records_trained": self.counts.records_trained,
        }

    def _record_step_metrics(self, result: StepResult, summary: dict[str, float]) -> None:
        m = self.metrics
        if m is None:
            return
        m.records_trained.inc(result.trained_records)
        m.train_steps.inc()
        m.model_step.set(result.step)
        m.elbo.set(summary["elbo"])
        m.kl.set(summary["kl"])
        m.reconstruction.set(summary["reconstruction"])
        m.gradient_norm.set(result.grad_norm)
        m.learning_rate.set(result.learning_rate)
        m.step_duration.observe(result.duration_seconds)
        m.batch_size.observe(result.scores.size)

    # -- checkpoints -------------------------------------------------------------------------------
    def _checkpoint_due(self) -> bool:
        steps = self.trainer.step - self._last_checkpoint_step
        if steps >= self.policy.every_steps:
            return True
        elapsed = time.monotonic() - self._last_checkpoint_time
        return elapsed >= self.policy.every_seconds and self._has_progress()

    def _has_progress(self) -> bool:
        return (
            len(self.batcher) > 0
            or self.trainer.step != self._last_checkpoint_step
            or self.state.next_offsets != self._last_checkpoint_offsets
        )

    def run_checkpoint(self, reason: str) -> SnapshotInfo | None:
        """Drain, flush outputs, write the snapshot, then commit offsets -- in that order, always."""
        if not self._has_progress():
            self._last_checkpoint_time = time.monotonic()
            return None
        started = time.perf_counter()
        # 1. nothing consumed stays pending: train the open micro-batch now.
        self._train_batch()
        # 2. outputs flushed: every latent, metric and dead letter is acknowledged.
        self.sink.flush()
        # 3. snapshot durable: model + optimizer + step + RNG + the offsets it covers.
        offsets = dict(self.state.next_offsets)
        self.counts.snapshots += 1
        info = self.store.write(self.checkpoint, self.trainer.step, self._meta(offsets))
        # 4. offsets committed: the group now agrees with the snapshot.
        self.source.commit(offsets)
        self._last_checkpoint_time = time.monotonic()
        self._last_checkpoint_step = self.trainer.step
        self._last_checkpoint_offsets = offsets
        if self.metrics is not None:
            self.metrics.snapshots.inc()
            self.metrics.snapshot_duration.observe(time.perf_counter() - started)
            self.metrics.last_snapshot.set(time.time())
            self.metrics.commits.inc()
        log.info("checkpoint (%s): step %d, snapshot %s", reason, self.trainer.step, info.path.name)
        return info

    def _meta(self, offsets: dict[Partition, int]) -> dict[str, Any]:
        return dict(
            self.snapshot_meta,
            offsets=encode_offsets(offsets),
            counts=asdict(self.counts),
            metrics=self.state.last_summary,
            heldout=self.state.last_heldout,
            estimator=self.trainer.estimator.name,
            bound=self.trainer.estimator.bound_name,
            history=self.history.to_json(),
        )

    def _update_lag(self) -> None:
        if self.metrics is None:
            return
        for partition in self.source.assignment():
            highwater = self.source.highwater(partition)
            position = self.state.next_offsets.get(partition)
            if highwater is None or position is None:
                continue
            topic, number = partition
            self.metrics.consumer_lag.labels(topic=topic, partition=str(number)).set(
                max(0, highwater - position)
            )
