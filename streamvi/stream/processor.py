"""The stream processor: fetch, ingest, micro-batch, score (and train), publish, checkpoint.

It owns only the order of things on the loop's thread, shared by every role: ingest
(streamvi/stream/ingest.py), the step pipeline (pipeline.py), outputs (publisher.py). What a
checkpoint does and what a failure rewinds to are the role's: the trainer snapshots
(streamvi/stream/online.py), an encoder replica only commits offsets (streamvi/stream/encoder.py).
It is Kafka-free: it sees only the RecordSource and OutputSink interfaces.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from streamvi.anomaly.monitor import AnomalyMonitor, Verdict
from streamvi.io.base import OutputSink, Partition, RawRecord, RecordSource
from streamvi.io.codecs import BatchDecoder, DecodeError
from streamvi.metrics import Health
from streamvi.snapshots.store import SnapshotInfo
from streamvi.stream.batching import MicroBatcher
from streamvi.stream.ingest import Block, Fetch, Ingest, TrainingShare, appended_at
from streamvi.stream.pipeline import Finished, KeepAlive, StepPipeline
from streamvi.stream.progress import OutputProgress
from streamvi.stream.publisher import AnyMetrics, NullMetrics, Publisher
from streamvi.stream.state import (
    EvaluationPolicy,
    LoopCounts,
    LoopState,
    OutputTopics,
    ProcessingPolicy,
    StreamState,
)
from streamvi.training.history import StepHistory
from streamvi.training.trainer import StepResult, Trainer

log = logging.getLogger(__name__)


class RoleCheckpoints(Protocol):
    """What the processor asks of a role's checkpoints (streamvi/stream/checkpoint.py)."""

    finished_step: int

    def due(self) -> bool: ...

    def run(self, reason: str) -> SnapshotInfo | None: ...

    def restart(self, offsets: dict[Partition, int]) -> None: ...

    def forget(self, partitions: Sequence[Partition]) -> None: ...


class RoleRecovery(Protocol):
    """What the processor asks of a role's recovery: the rewind epoch and the divergence guard."""

    epoch: int
    pending: str | None

    def rewind(self, reason: str, state: StreamState, routine: bool = False) -> StreamState: ...

    def note_step(self, result: StepResult) -> None: ...

    @property
    def diverged(self) -> bool: ...

    def recover_from_divergence(self) -> None: ...

    def close(self) -> None: ...


class StreamProcessor(ABC):
    """Consumes a record source in micro-batches through the step pipeline and publishes each
    finished step in order; the role decides what a step does, checkpoints and rewinds."""

    def __init__(
        self,
        *,
        source: RecordSource,
        sink: OutputSink,
        decoder: BatchDecoder,
        trainer: Trainer,
        topics: OutputTopics,
        progress: OutputProgress,
        max_batch_latency_seconds: float,
        metrics: AnyMetrics | None = None,
        health: Health | None = None,
        max_poll_records: int = 1000,
        lag_interval_seconds: float = 5.0,
        evaluation: EvaluationPolicy | None = None,
        processing: ProcessingPolicy | None = None,
        pipeline_depth: int = 2,
        share: TrainingShare | None = None,
        anomaly: AnomalyMonitor | None = None,
    ) -> None:
        self.source, self.sink, self.trainer = source, sink, trainer
        #: Percentiles, flags and drift of the scores (streamvi/anomaly), or None: off.
        self.anomaly = anomaly
        #: Reference scores are the records never trained on when the role has such a share (held
        #: out, or outside the training sample), else every record's prequential score.
        self._reference_untrained = evaluation is not None or (share is not None and share.fraction < 1.0)
        self.processing = processing or ProcessingPolicy()
        self.evaluation = evaluation
        self.metrics: AnyMetrics = metrics if metrics is not None else NullMetrics()
        self.health = health or Health()
        self.max_poll_records = max_poll_records
        self.lag_interval_seconds = lag_interval_seconds
        self.stream = StreamState()
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
        self.progress = progress
        self.ingest = Ingest(decoder, evaluation, share)
        self.publisher = Publisher(
            sink,
            topics,
            trainer,
            self.metrics,
            self.progress,
            anomaly.settings.threshold_percentile if anomaly is not None else None,
        )
        self._last_lag_time = 0.0
        #: Some assigned partition has no lag exported yet: compute it on every iteration until it
        #: has (the high-water mark arrives with the first fetch response after an assignment).
        self._lag_pending = False
        #: When partitions were last assigned: an idle timeout counts from then, not from the start
        #: (joining the group is not an idle stream). None until the first assignment.
        self._assigned_at: float | None = None
        source.set_rebalance_callbacks(self.on_assigned, self.on_revoked)

    # -- the role's parts ----------------------------------------------------------------------------
    @property
    @abstractmethod
    def recovery(self) -> RoleRecovery:
        """What a failure rewinds to, and the guard against diverging updates."""

    @property
    @abstractmethod
    def checkpoints(self) -> RoleCheckpoints:
        """When a checkpoint is due and what it commits, in the role's documented order."""

    def _before_run(self) -> None:  # noqa: B027 -- optional hook
        """Called once as ``run`` starts, before the first poll."""

    def _after_run(self) -> None:  # noqa: B027 -- optional hook
        """Called once as ``run`` returns, after the final checkpoint."""

    def _between_batches(self) -> None:  # noqa: B027 -- optional hook
        """Called before each batch is submitted and at each turn of the loop: no batch is being
        scored by the loop's thread (queued ones keep what they were submitted with)."""

    def _step_published(self, result: StepResult, n: int) -> None:  # noqa: B027 -- optional hook
        """Called after a finished step of ``n`` records was published."""

    def _judged(self, result: StepResult, verdict: Verdict) -> None:  # noqa: B027 -- optional hook
        """Called after a finished step's anomaly verdict was published (a drift is the trainer's)."""

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

    # -- rebalance hooks (called from inside source.poll on this thread) -----------------------------
    def on_assigned(self, partitions: Sequence[Partition]) -> None:
        self.health.set(partitions_assigned=bool(self.source.assignment()) or bool(partitions))
        self._lag_pending = True
        self._assigned_at = time.monotonic()

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
            self.checkpoints.forget(partitions)
        for topic, number in partitions:  # no longer ours: its lag is another consumer's to report
            self.metrics.consumer_lag.remove(topic, str(number))
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
        self._before_run()
        while not stop.is_set() and (max_records is None or consumed < max_records):
            self.health.beat()  # /livez turns 503 when iterations stop for metrics.liveness_timeout_seconds
            self._between_batches()
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
            elif (
                idle_timeout_seconds is not None
                and self._idle_for(now, last_record_time) >= idle_timeout_seconds
            ):
                log.info("no input for %.1fs since partitions were assigned; stopping", idle_timeout_seconds)
                break
            # A partial batch past its latency bound goes as soon as the step thread is idle; while
            # steps are queued it keeps filling, since it could not start any sooner.
            if self.pipeline.batcher.due() and not len(self.pipeline):
                self._submit_batch()
            if self.checkpoints.due():
                self.run_checkpoint(reason="interval")
            if self._lag_pending or now - self._last_lag_time >= self.lag_interval_seconds:
                self._lag_pending = not self._update_lag()
                self._last_lag_time = now
        self.run_checkpoint(reason="shutdown")
        self._update_lag()
        self.pipeline.shutdown()
        self.recovery.close()
        self._after_run()
        return self.counts

    def _idle_for(self, now: float, last_record_time: float) -> float:
        """Seconds without input while partitions are assigned (0 before the first assignment)."""
        if self._assigned_at is None:
            return 0.0
        return now - max(last_record_time, self._assigned_at)

    def _poll_timeout(self) -> float:
        """While steps are queued 5 ms (an overdue open batch waits for them anyway: no busy polling
        on the cores the step needs), else until the open batch is due (0.2 s at most)."""
        if len(self.pipeline):
            return 0.005
        wait = self.pipeline.batcher.time_left()
        return 0.2 if wait is None else min(0.2, wait)

    def handle(self, records: list[RawRecord]) -> None:
        """Ingest one fetch: decode it at once and move it into micro-batches, a block at a time,
        submitting each batch as it fills (and checkpointing when one is due)."""
        self.metrics.records_consumed.inc(len(records))
        self.progress.note_replays(records)
        epoch = self.recovery.epoch
        fetch = self.ingest.decode(records)
        self._fetch_decoded(fetch)
        blocks = self.ingest.blocks(
            fetch,
            room=lambda: self.pipeline.batcher.room,
            dead_letter=self._dead_letter,
            stale=lambda: self.recovery.epoch != epoch,
        )
        for block in blocks:
            # consumed as the offsets move past it, block by block: a checkpoint inside the fetch
            # saves the count its offsets cover, and a rewind leaves the rest for the next fetch
            self.state.next_offsets.update({(r.topic, r.partition): r.offset + 1 for r in block.consumed})
            self.counts.records_consumed += len(block.consumed)
            if block.records:
                self._add_block(fetch, block)
            if self.pipeline.batcher.full:
                self._submit_batch()
                if self.checkpoints.due():
                    self.run_checkpoint(reason="interval")
        if self.recovery.epoch == epoch:
            self._fetch_handled()

    def _add_block(self, fetch: Fetch, block: Block) -> None:
        batcher = self.pipeline.batcher
        opened = appended_at(block.records[0], batcher.max_latency_seconds) if not len(batcher) else None
        decoded, rows = fetch.decoded, block.rows
        batcher.add_rows(
            block.records, decoded.x[rows], block.record_ids, decoded.c[rows], fetch.train[rows], now=opened
        )

    def _fetch_decoded(self, fetch: Fetch) -> None:  # noqa: B027 -- optional hook
        """A fetch was decoded, before any of it is batched."""

    def _fetch_handled(self) -> None:  # noqa: B027 -- optional hook
        """A fetch was processed in full (no rewind during it)."""

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
        self._between_batches()
        evaluation = self.evaluation
        self.pipeline.submit(
            evaluation.every_steps if evaluation is not None else None,
            self._heldout_payload,
            lambda: evaluation.reservoir.contents() if evaluation is not None else None,
            self.anomaly.thresholds() if self.anomaly is not None else None,
        )

    def _heldout_payload(self, step: int, x: np.ndarray, c: np.ndarray) -> dict[str, Any] | None:
        """Runs on the step thread, right after step ``step``; only a role with evaluation has one."""
        return None

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
        """Submit the open batch and publish every submitted step; False if that rewound."""
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
        verdict = self._judge(finished)
        self.publisher.batch(
            finished.records,
            finished.record_ids,
            result,
            finished.heldout,
            self.stream,
            finished.model,
            finished.observed,
            verdict,
            finished.thresholds,
        )
        self._step_published(result, len(finished.records))
        if verdict is not None:
            self._judged(result, verdict)
        self.recovery.note_step(result)
        if self.recovery.diverged:
            self._drain()  # the steps queued behind it ran on the diverged parameters
            if self.recovery.diverged:
                self.recovery.recover_from_divergence()

    def _judge(self, finished: Finished) -> Verdict | None:
        """The batch's anomaly verdict, judged against the thresholds it was submitted with."""
        if self.anomaly is None or finished.thresholds is None:
            return None
        bound = finished.result.scores.bound
        untrained = finished.untrained
        reference = (
            untrained
            if self._reference_untrained and untrained is not None
            else np.ones(bound.shape, dtype=bool)
        )
        return self.anomaly.judge(bound, finished.thresholds, reference, finished.result.model_ready)

    # -- checkpoints and rewinds ---------------------------------------------------------------------
    def run_checkpoint(self, reason: str) -> SnapshotInfo | None:
        """Drain, flush outputs, then commit as the role does (streamvi/stream/checkpoint.py)."""
        return self.checkpoints.run(reason)

    def _rewind(self, reason: str, routine: bool = False) -> None:
        self.stream = self.recovery.rewind(reason, self.stream, routine)
        self.checkpoints.restart(self.state.next_offsets)

    def _update_lag(self) -> bool:
        """Export each assigned partition's lag: high-water mark minus the next offset to process
        (the loop's, or before its first record from that partition the consumer's position).

        Only known values are exported, never a guess: the high-water mark comes with fetch
        responses, so a partition has its lag from the first fetch after its assignment. True when
        every assigned partition has one.
        """
        complete = True
        for partition in self.source.assignment():
            highwater = self.source.highwater(partition)
            position = self.state.next_offsets.get(partition)
            if position is None and highwater is not None:
                position = self.source.position(partition)
            if highwater is None or position is None:
                complete = False
                continue
            topic, number = partition
            self.metrics.consumer_lag.labels(topic=topic, partition=str(number)).set(
                max(0, highwater - position)
            )
        return complete
