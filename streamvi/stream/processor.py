"""The stream processor: fetch, ingest, micro-batch, score-then-train, publish, checkpoint.

It wires the stream path's rooms together and owns only the order of things: ingest
(streamvi/stream/ingest.py), the step pipeline (pipeline.py), outputs (publisher.py), checkpoints
and their commit order (checkpoint.py, committers.py) and recovery (recovery.py). It is Kafka-free:
it sees only the RecordSource and OutputSink interfaces.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from streamvi.io.base import OutputSink, Partition, RawRecord, RecordSource
from streamvi.io.codecs import BatchDecoder, DecodeError
from streamvi.metrics import Health, Metrics
from streamvi.snapshots.compatibility import check_snapshot_matches
from streamvi.snapshots.store import SnapshotInfo, SnapshotStore
from streamvi.stream.batching import MicroBatcher
from streamvi.stream.checkpoint import Checkpoints
from streamvi.stream.committers import committer_for
from streamvi.stream.ingest import Ingest, appended_at
from streamvi.stream.pipeline import KeepAlive, StepPipeline
from streamvi.stream.progress import OutputProgress
from streamvi.stream.publisher import AnyMetrics, NullMetrics, Publisher, heldout_payload
from streamvi.stream.recovery import Recovery
from streamvi.stream.state import (
    CheckpointPolicy,
    EvaluationPolicy,
    LoopCounts,
    LoopState,
    OutputTopics,
    ProcessingPolicy,
    StreamState,
)
from streamvi.training.history import StepHistory
from streamvi.training.trainer import Trainer

log = logging.getLogger(__name__)


class OnlineLoop:
    """Runs SGVI on a record stream: each batch is scored before it is trained on, and every
    checkpoint commits in the documented order (streamvi/stream/checkpoint.py)."""

    def __init__(
        self,
        *,
        source: RecordSource,
        sink: OutputSink,
        decoder: BatchDecoder,
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
        processing: ProcessingPolicy | None = None,
        pipeline_depth: int = 2,
    ) -> None:
        self.source, self.sink, self.trainer, self.store = source, sink, trainer, store
        self.processing = processing or ProcessingPolicy()
        self.evaluation = evaluation
        self.metrics: AnyMetrics = metrics if metrics is not None else NullMetrics()
        self.health = health or Health()
        self.snapshot_meta = dict(snapshot_meta or {})
        self.max_poll_records = max_poll_records
        self.lag_interval_seconds = lag_interval_seconds
        self.stream = StreamState()
        self.checkpoint = tf.train.Checkpoint(**trainer.checkpoint_objects())
        self.keepalive = KeepAlive(source, self.processing.keepalive_seconds)
        self.pipeline = StepPipeline(
            trainer,
            pipeline_depth,
            max_batch_latency_seconds,
            decoder.dim,
            decoder.context_dim,
            self.keepalive,
            count_observed=getattr(decoder, "reports_observed", False),
        )
        self.progress = OutputProgress(store, lambda count: self.metrics.replayed_records.inc(count))
        self.committer = committer_for(self.processing.exactly_once, source, sink, store, self.progress)
        self.ingest = Ingest(decoder, evaluation)
        self.publisher = Publisher(sink, topics, trainer, self.metrics, self.progress)
        self.recovery = self._recovery()
        self.checkpoints = self._checkpoints(policy)
        self._last_lag_time = 0.0
        self._warmed_up = False
        source.set_rebalance_callbacks(self.on_assigned, self.on_revoked)

    def _recovery(self) -> Recovery:
        return Recovery(
            processing=self.processing,
            trainer=self.trainer,
            checkpoint=self.checkpoint,
            store=self.store,
            source=self.source,
            pipeline=self.pipeline,
            committer=self.committer,
            progress=self.progress,
            metrics=self.metrics,
        )

    def _checkpoints(self, policy: CheckpointPolicy) -> Checkpoints:
        return Checkpoints(
            policy=policy,
            committer=self.committer,
            sink=self.sink,
            trainer=self.trainer,
            checkpoint=self.checkpoint,
            pipeline=self.pipeline,
            state=lambda: self.stream,
            snapshot_meta=self.snapshot_meta,
            drain=self._train_and_drain,
            rewind=self._rewind,
            pending_rewind=lambda: self.recovery.pending,
            trusted=self.recovery.committed,
            metrics=self.metrics,
        )

    # -- what the rest of the daemon reads -----------------------------------------------------------
    @property
    def state(self) -> LoopState:
        """Next offset per partition and the last step's and held-out figures."""
        return self.stream.loop

    @property
    def counts(self) -> LoopCounts:
        return self.stream.counts

    @property
    def history(self) -> StepHistory:
        return self.stream.history

    @property
    def batcher(self) -> MicroBatcher:
        """The micro-batch now filling."""
        return self.pipeline.batcher

    # -- start-up ------------------------------------------------------------------------------------
    def restore(self) -> SnapshotInfo | None:
        """Load the newest trusted snapshot (if any) and make the source resume at its offsets."""
        info = self.committer.trusted_snapshot(self._check_matches_config)
        if info is not None:
            self.stream = self.recovery.load(info)
            log.info("restored snapshot %s at step %d, offsets %s", info.path.name, info.step, info.offsets)
        if not self.processing.exactly_once:
            self._count_replays(info)
        self.pipeline.submitted_step = self.trainer.step
        self.checkpoints.restart(self.state.next_offsets)
        self.recovery.start_from(info)
        self.health.set(model_loaded=True)
        self.metrics.model_step.set(self.trainer.step)
        return info

    def _check_matches_config(self, info: SnapshotInfo) -> None:
        """Refuse a snapshot written under other structural settings than the ones this loop's
        snapshots record (its checkpoint would not fit); without a config on either side, allow it."""
        config, snapshot_config = self.snapshot_meta.get("config"), info.meta.get("config")
        if isinstance(config, Mapping) and isinstance(snapshot_config, Mapping):
            check_snapshot_matches(info.path, snapshot_config, config)

    def _count_replays(self, info: SnapshotInfo | None) -> None:
        """At-least-once: outputs sent after the snapshot before a crash will be sent again."""
        start = dict(info.offsets) if info is not None else {}
        sent = self.store.read_progress()
        missing = [p for p in sent if p not in start]
        if missing:
            start.update(self.source.committed_offsets(missing))
        self.progress.resume(sent, start)

    # -- rebalance hooks (called from inside source.poll on this thread) -----------------------------
    def on_assigned(self, partitions: Sequence[Partition]) -> None:
        self.health.set(partitions_assigned=bool(self.source.assignment()) or bool(partitions))

    def on_revoked(self, partitions: Sequence[Partition]) -> None:
        """Checkpoint what was consumed before the partitions go (their offsets can be committed
        only while they are still ours); during a long step or snapshot, roll the interval back."""
        if partitions and self.keepalive.busy:
            self.recovery.pending = "partitions revoked during a long step or snapshot"
        elif partitions:
            self.keepalive.suspended = True  # no keep-alive polls from inside this poll's callback
            try:
                self.run_checkpoint(reason="rebalance")
            finally:
                self.keepalive.suspended = False
            for partition in partitions:
                self.state.next_offsets.pop(partition, None)
                self.checkpoints.interval.offsets.pop(partition, None)
        self.health.set(partitions_assigned=False)

    # -- the loop ------------------------------------------------------------------------------------
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
        consumed, last_record_time = 0, time.monotonic()
        self._warm_up()
        while not stop.is_set() and (max_records is None or consumed < max_records):
            self.health.beat()  # /livez turns 503 when iterations stop for metrics.liveness_timeout_seconds
            self._publish_finished()  # as soon as steps are done, even if input is idle
            budget = (
                self.max_poll_records
                if max_records is None
                else min(self.max_poll_records, max_records - consumed)
            )
            records = self.source.poll(self._poll_timeout(), budget)
            now = time.monotonic()
            if records:
                last_record_time, consumed = now, consumed + len(records)
                self.handle(records)
            elif idle_timeout_seconds is not None and now - last_record_time >= idle_timeout_seconds:
                log.info("no input for %.1fs; stopping", idle_timeout_seconds)
                break
            # A partial batch past its latency bound goes as soon as the step thread is idle; while
            # steps are queued it keeps filling, since it could not start any sooner.
            if self.pipeline.batcher.due() and not len(self.pipeline):
                self._submit_batch()
            if self.checkpoints.due():
                self.run_checkpoint(reason="interval")
            if now - self._last_lag_time >= self.lag_interval_seconds:
                self._update_lag()
                self._last_lag_time = now
        self.run_checkpoint(reason="shutdown")
        self._update_lag()
        self.pipeline.shutdown()
        self.recovery.close()
        return self.counts

    def _poll_timeout(self) -> float:
        wait = self.pipeline.batcher.time_left()
        timeout = 0.2 if wait is None else min(0.2, wait)
        return min(timeout, 0.005) if len(self.pipeline) else timeout

    def _warm_up(self) -> None:
        """Compile the step on the step thread while the first polls join the group."""
        if not self._warmed_up:
            self._warmed_up = True
            self.pipeline.executor().submit(self._compile_step)

    def _compile_step(self) -> None:
        """Runs on the step thread. A failure is only logged: the first real step meets the same
        error and reports it."""
        try:
            seconds = self.trainer.warm_up()
        except Exception:
            log.exception("compiling the training step ahead of the first batch failed")
            return
        log.info("training step compiled in %.2fs", seconds)
        self.metrics.step_compile.set(seconds)

    def handle(self, records: list[RawRecord]) -> None:
        """Ingest one fetch: decode it at once and move it into micro-batches, a block at a time,
        submitting each batch as it fills (and checkpointing when one is due)."""
        self.metrics.records_consumed.inc(len(records))
        self.counts.records_consumed += len(records)
        self.progress.note_replays(records)
        epoch = self.recovery.epoch
        fetch = self.ingest.decode(records)
        blocks = self.ingest.blocks(
            fetch,
            room=lambda: self.pipeline.batcher.room,
            dead_letter=self._dead_letter,
            stale=lambda: self.recovery.epoch != epoch,
        )
        for block in blocks:
            self.state.next_offsets.update({(r.topic, r.partition): r.offset + 1 for r in block.consumed})
            batcher = self.pipeline.batcher
            opened = (
                appended_at(block.records[0], batcher.max_latency_seconds)
                if block.records and not len(batcher)
                else None
            )
            decoded = fetch.decoded
            rows = block.rows
            batcher.add_rows(
                block.records,
                decoded.x[rows],
                block.record_ids,
                decoded.c[rows],
                fetch.train[rows],
                now=opened,
            )
            if batcher.full:
                self._submit_batch()
                if self.checkpoints.due():
                    self.run_checkpoint(reason="interval")
        if self.recovery.epoch == epoch:
            self.committer.fetch_handled()

    def _dead_letter(self, record: RawRecord, error: DecodeError) -> None:
        self.publisher.dead_letter(record, error, self.stream)

    # -- steps ---------------------------------------------------------------------------------------
    def _submit_batch(self) -> None:
        """Queue the open batch for the step thread (after waiting for room) and return at once."""
        if len(self.pipeline.batcher) == 0 or self.recovery.pending is not None:
            return
        epoch = self.recovery.epoch
        while self.pipeline.full:
            self._complete_oldest()
            if self.recovery.epoch != epoch:
                return  # rewound while waiting: the open batch was dropped
        evaluation = self.evaluation
        self.pipeline.submit(
            evaluation.every_steps if evaluation is not None else None,
            self._heldout_payload,
            lambda: evaluation.reservoir.contents() if evaluation is not None else None,
        )

    def _publish_finished(self) -> None:
        """Publish every step at the head of the pipeline that has finished (never waits)."""
        while self.pipeline.oldest_finished():
            self._complete_oldest()

    def _drain(self) -> None:
        """Wait for every submitted step and publish it (stops early if that rewinds)."""
        epoch = self.recovery.epoch
        while len(self.pipeline) and self.recovery.epoch == epoch:
            self._complete_oldest()

    def _train_and_drain(self) -> bool:
        """Train the open batch and publish every submitted step; False if that rewound."""
        epoch = self.recovery.epoch
        self._submit_batch()
        self._drain()
        return self.recovery.epoch == epoch

    def _complete_oldest(self) -> None:
        """Publish the oldest submitted step once it has run; a pending rewind is carried out instead."""
        finished = self.pipeline.pop_oldest()
        if self.recovery.pending is not None:
            self._rewind(self.recovery.pending)
            return
        result = finished.result
        self.checkpoints.finished_step = result.step
        self.publisher.batch(
            finished.records, finished.record_ids, result, finished.heldout, self.stream, finished.observed
        )
        self.recovery.note_step(result)
        if self.recovery.diverged:
            self._drain()  # the steps queued behind it ran on the diverged parameters
            if self.recovery.diverged:
                self.recovery.recover_from_divergence()

    def _heldout_payload(self, step: int, x: np.ndarray, c: np.ndarray) -> dict[str, Any] | None:
        """Runs on the step thread, right after step ``step``."""
        assert self.evaluation is not None
        return heldout_payload(self.trainer, self.evaluation.importance_samples, step, x, c)

    # -- checkpoints and recovery --------------------------------------------------------------------
    def run_checkpoint(self, reason: str) -> SnapshotInfo | None:
        """Drain, flush outputs, write the snapshot, then commit offsets (streamvi/stream/checkpoint.py)."""
        return self.checkpoints.run(reason)

    def _rewind(self, reason: str) -> None:
        self.stream = self.recovery.rewind(reason, self.stream)
        self.checkpoints.restart(self.state.next_offsets)

    def forget_positions(self) -> None:
        """Forget every partition's position, as for a source that starts anew."""
        self.stream.loop = LoopState(last_summary=self.state.last_summary)
        self.checkpoints.interval.offsets = {}

    def _update_lag(self) -> None:
        for partition in self.source.assignment():
            highwater = self.source.highwater(partition)
            position = self.state.next_offsets.get(partition)
            if highwater is None or position is None:
                continue
            topic, number = partition
            self.metrics.consumer_lag.labels(topic=topic, partition=str(number)).set(
                max(0, highwater - position)
            )
