"""The encoder-replica role: score every record with the newest trusted snapshot, never train.

Replicas share the input topic's partitions through their own consumer group. Each batch is
scored by one model, whole: a newer snapshot, loaded beside the one in use by the watcher
(streamvi/snapshots/watcher.py), is switched to between two batches. Checkpoints only flush and
commit offsets (streamvi/stream/checkpoint.py, ``OffsetCommits``); a failure rewinds to the
group's committed offsets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from streamvi.io.base import OutputSink, RecordSource
from streamvi.io.codecs import BatchDecoder
from streamvi.metrics import EncoderMetrics, Health
from streamvi.snapshots.watcher import LoadedModel, SnapshotWatcher
from streamvi.stream.checkpoint import OffsetCommits
from streamvi.stream.ingest import TrainingShare
from streamvi.stream.processor import StreamProcessor
from streamvi.stream.progress import OutputProgress
from streamvi.stream.publisher import NullMetrics
from streamvi.stream.recovery import RewindBackoff
from streamvi.stream.state import CheckpointPolicy, LoopState, OutputTopics, ProcessingPolicy, StreamState
from streamvi.training.trainer import StepResult

log = logging.getLogger(__name__)


class ReplicaRecovery(RewindBackoff):
    """A replica's rewind: drop the interval's outputs (exactly-once: abort the transaction) and
    its queued batches, and consume again from the group's committed offsets. A replica does not
    train, so nothing can diverge."""

    def __init__(
        self,
        processing: ProcessingPolicy,
        source: RecordSource,
        sink: OutputSink,
        cancel: Callable[[], None],
        progress: OutputProgress,
    ) -> None:
        super().__init__(processing)
        self.source = source
        self.sink = sink
        self._cancel = cancel
        self.progress = progress

    def rewind(self, reason: str, state: StreamState, routine: bool = False) -> StreamState:
        self.begin_rewind(reason, "the committed offsets", routine)
        if self.processing.exactly_once:
            try:
                self.sink.abort_transaction()
            except Exception as exc:  # it times out on the broker; the records are consumed again
                log.warning("aborting the transaction failed (it will time out on the broker): %s", exc)
        self._cancel()  # batches queued or running belong to the abandoned interval
        self.source.seek({})  # every assigned partition back to the group's committed offset
        if not self.processing.exactly_once:
            self.progress.rewind_to({})
        return StreamState(state.counts, LoopState(), state.history)

    def committed(self) -> None:
        self.checkpoint_committed()

    def note_step(self, result: StepResult) -> None:
        return None

    @property
    def diverged(self) -> bool:
        return False

    def recover_from_divergence(self) -> None:
        return None

    def close(self) -> None:
        return None


class EncoderLoop(StreamProcessor):
    """Consumes its share of the input, publishes one latents message per record (naming the
    snapshot that scored it), commits offsets every ``policy.every_seconds``."""

    def __init__(
        self,
        *,
        source: RecordSource,
        sink: OutputSink,
        decoder: BatchDecoder,
        watcher: SnapshotWatcher,
        model: LoadedModel,
        topics: OutputTopics,
        policy: CheckpointPolicy,
        max_batch_latency_seconds: float,
        metrics: EncoderMetrics | None = None,
        health: Health | None = None,
        max_poll_records: int = 1000,
        lag_interval_seconds: float = 5.0,
        processing: ProcessingPolicy | None = None,
        pipeline_depth: int = 2,
    ) -> None:
        if topics.latents is None:
            raise ValueError("an encoder replica publishes latents: it needs a latents topic")
        self.watcher = watcher
        self.encoder_metrics = metrics
        progress = OutputProgress(None, lambda count: self.metrics.replayed_records.inc(count))
        super().__init__(
            source=source,
            sink=sink,
            decoder=decoder,
            trainer=model.trainer,
            topics=topics,
            progress=progress,
            max_batch_latency_seconds=max_batch_latency_seconds,
            metrics=metrics if metrics is not None else NullMetrics(),
            health=health,
            max_poll_records=max_poll_records,
            lag_interval_seconds=lag_interval_seconds,
            evaluation=None,
            processing=processing,
            pipeline_depth=pipeline_depth,
            share=TrainingShare(0.0, score_all=True),
            anomaly=model.anomaly,
        )
        self._recovery = ReplicaRecovery(self.processing, source, sink, self.pipeline.cancel, progress)
        self._checkpoints = OffsetCommits(
            policy=policy,
            exactly_once=self.processing.exactly_once,
            source=source,
            sink=sink,
            pipeline=self.pipeline,
            state=lambda: self.stream,
            drain=self._train_and_drain,
            rewind=self._rewind,
            pending_rewind=lambda: self._recovery.pending,
            committed=self._recovery.committed,
            metrics=self.metrics,
        )
        self.model: LoadedModel = model
        self.use(model)

    @property
    def recovery(self) -> ReplicaRecovery:
        return self._recovery

    @property
    def checkpoints(self) -> OffsetCommits:
        return self._checkpoints

    def use(self, model: LoadedModel) -> None:
        """Score every batch submitted from now on with ``model`` (batches already queued keep theirs)."""
        previous = self.model
        self.model = model
        self.trainer = self.pipeline.trainer = self.publisher.trainer = model.trainer
        self.anomaly = model.anomaly  # percentiles against the reference of the snapshot in use
        self.pipeline.model = model.name
        self.health.set(model_loaded=True)
        if self.encoder_metrics is not None:
            if model is not previous:
                self.encoder_metrics.snapshot_reloads.inc()
            self.encoder_metrics.serving(model.info.step, model.info.written_at)
        log.info("encoding with snapshot %s (step %d)", model.name, model.info.step)

    def _before_run(self) -> None:
        self.watcher.start()

    def _after_run(self) -> None:
        self.watcher.stop()

    def _between_batches(self) -> None:
        newer = self.watcher.take()
        if newer is not None:
            self.use(newer)

    def _step_published(self, result: StepResult, n: int) -> None:
        if self.encoder_metrics is not None:
            self.encoder_metrics.records_encoded.inc(n)

    def run_checkpoint(self, reason: str) -> None:
        self.checkpoints.run(reason)
        return None
