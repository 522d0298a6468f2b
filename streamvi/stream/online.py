"""The trainer role: score-then-train every batch, snapshot, and rewind to the trusted snapshot.

Its checkpoints write a snapshot between flushing outputs and committing offsets
(streamvi/stream/checkpoint.py, committers.py); a failure rewinds to the newest trusted snapshot
(recovery.py). The shared fetch-to-publish order is the processor's (processor.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from streamvi.anomaly.monitor import STATE_FILE, AnomalyMonitor, Verdict
from streamvi.anomaly.responses import Change
from streamvi.io.base import OutputSink, RecordSource
from streamvi.io.codecs import BatchDecoder, metrics_message
from streamvi.metrics import Health, Metrics
from streamvi.snapshots.compatibility import check_snapshot_matches
from streamvi.snapshots.sample import SAMPLE_FILE, encode_sample, load_sample
from streamvi.snapshots.store import SnapshotInfo, SnapshotStore
from streamvi.stream.checkpoint import Checkpoints
from streamvi.stream.committers import committer_for
from streamvi.stream.ingest import Fetch, TrainingShare
from streamvi.stream.processor import StreamProcessor
from streamvi.stream.progress import OutputProgress
from streamvi.stream.publisher import heldout_payload, trainer_metrics
from streamvi.stream.recovery import Recovery
from streamvi.stream.state import (
    CheckpointPolicy,
    EvaluationPolicy,
    LoopState,
    OutputTopics,
    ProcessingPolicy,
)
from streamvi.training.results import StepResult
from streamvi.training.trainer import Trainer

log = logging.getLogger(__name__)


class OnlineLoop(StreamProcessor):
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
        share: TrainingShare | None = None,
        anomaly: AnomalyMonitor | None = None,
    ) -> None:
        self.store = store
        self.snapshot_meta = dict(snapshot_meta or {})
        #: Held-out ELBOs under the current parameters, for the anomaly reference (see _rescored).
        self._fresh_reference: np.ndarray | None = None
        self._warmed_up = False
        progress = OutputProgress(store, lambda count: self.metrics.replayed_records.inc(count))
        super().__init__(
            source=source,
            sink=sink,
            decoder=decoder,
            trainer=trainer,
            topics=topics,
            progress=progress,
            max_batch_latency_seconds=max_batch_latency_seconds,
            metrics=metrics,
            health=health,
            max_poll_records=max_poll_records,
            lag_interval_seconds=lag_interval_seconds,
            evaluation=evaluation,
            processing=processing,
            pipeline_depth=pipeline_depth,
            share=share,
            anomaly=anomaly,
        )
        self.checkpoint = tf.train.Checkpoint(**trainer.checkpoint_objects())
        self.committer = committer_for(
            self.processing.exactly_once, source, sink, store, self.progress, self._writes_snapshots()
        )
        self._recovery = self._make_recovery(
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
        self._checkpoints = self._make_checkpoints(
            policy=policy,
            committer=self.committer,
            sink=self.sink,
            trainer=self.trainer,
            checkpoint=self.checkpoint,
            pipeline=self.pipeline,
            state=lambda: self.stream,
            snapshot_meta=self.snapshot_meta,
            snapshot_files=self._snapshot_files,
            drain=self._train_and_drain,
            rewind=self._rewind,
            pending_rewind=lambda: self._recovery.pending,
            trusted=self._recovery.committed,
            metrics=self.metrics,
        )

    def _make_recovery(self, **parts: Any) -> Recovery:
        """The role's recovery from its parts (a trainer worker's rewinds are agreed)."""
        return Recovery(**parts)

    def _make_checkpoints(self, **parts: Any) -> Checkpoints:
        """The role's checkpoints from their parts (a trainer worker's are collective)."""
        return Checkpoints(**parts)

    @property
    def recovery(self) -> Recovery:
        return self._recovery

    @property
    def checkpoints(self) -> Checkpoints:
        return self._checkpoints

    # -- start-up ------------------------------------------------------------------------------------
    def _writes_snapshots(self) -> bool:
        """Whether this loop writes the snapshot store (discards and prunes in it): a trainer does."""
        return True

    def restore(self) -> SnapshotInfo | None:
        """Load the newest trusted snapshot (if any) and make the source resume at its offsets."""
        info = self.committer.trusted_snapshot(self._check_matches_config)
        if info is not None:
            self.stream = self.recovery.load(info)
            self._restore_heldout(info)
            self._restore_anomaly(info)
            log.info(
                "snapshot: restored %s at step %d, resuming at offsets %s",
                info.path.name,
                info.step,
                info.offsets or "(none recorded)",
            )
        else:
            log.info("snapshot: none in %s, starting a new model from training.seed", self.store.directory)
        if not self.processing.exactly_once:
            self._count_replays(info)
        self.pipeline.submitted_step = self.trainer.step
        self.checkpoints.restart(self.state.next_offsets)
        self.recovery.start_from(info)
        self.health.set(model_loaded=True)
        self.metrics.model_step.set(self.trainer.step)
        return info

    def _snapshot_files(self) -> dict[str, bytes]:
        """The held-out sample saved with a snapshot (streamvi/snapshots/sample.py), when kept, and
        the anomaly state (reference sketches, drift detector, adaptation: streamvi/anomaly)."""
        files = {} if self.anomaly is None else {STATE_FILE: self.anomaly.state()}
        evaluation = self.evaluation
        if evaluation is None or evaluation.snapshot_sample_records <= 0 or not len(evaluation.reservoir):
            return files
        x, c = evaluation.reservoir.newest(evaluation.snapshot_sample_records)
        return {**files, SAMPLE_FILE: encode_sample(x, c)}

    def _restore_anomaly(self, info: SnapshotInfo) -> None:
        """The anomaly reference, detector and adaptation as the snapshot saved them (a snapshot
        written without them leaves them new)."""
        if self.anomaly is None or STATE_FILE not in info.meta.get("files", {}):
            return
        self.anomaly.load((info.path / STATE_FILE).read_bytes())
        metrics = trainer_metrics(self.metrics)
        metrics.record_drift_time(self.anomaly.last_drift_time)
        metrics.drift_adapting.set(1.0 if self.anomaly.adapting else 0.0)

    def _restore_heldout(self, info: SnapshotInfo) -> None:
        """Refill the held-out reservoir from the snapshot's sample: the evaluation goes on with the
        newest held-out records seen before the restart, and the next snapshot keeps them."""
        evaluation = self.evaluation
        sample = load_sample(info) if evaluation is not None else None
        if evaluation is None or sample is None:
            return
        x, c = sample
        reservoir = evaluation.reservoir
        if x.shape[1] != reservoir.x.shape[1] or c.shape[1] != reservoir.c.shape[1]:
            return  # written for another input shape (refused by the compatibility check anyway)
        for row in range(max(0, len(x) - reservoir.capacity), len(x)):
            reservoir.add(x[row], c[row])

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

    # -- hooks ---------------------------------------------------------------------------------------
    def _before_run(self) -> None:
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
        trainer_metrics(self.metrics).step_compile.set(seconds)

    def _fetch_decoded(self, fetch: Fetch) -> None:
        if fetch.outside_share:
            trainer_metrics(self.metrics).records_outside_share.inc(fetch.outside_share)

    def _fetch_handled(self) -> None:
        self.committer.fetch_handled()

    def _judged(self, result: StepResult, verdict: Verdict) -> None:
        """Count trained records against a drift's adaptation, act on a detected drift, and run the
        response's changes on the step thread (behind the steps already queued)."""
        assert self.anomaly is not None
        monitor = self.anomaly
        metrics = trainer_metrics(self.metrics)
        monitor.note_trained(result.trained_records)
        fresh, self._fresh_reference = self._fresh_reference, None
        if fresh is not None and not verdict.drift:
            monitor.refresh(fresh)
        if self._step_counts_for_response(result):
            self._run_change(monitor.response.after_step(self.trainer))
        if verdict.drift:
            self._drift_found(monitor, result.step)
        metrics.drift_adapting.set(1.0 if monitor.adapting else 0.0)

    def _step_counts_for_response(self, result: StepResult) -> bool:
        """Whether a step counts against a drift response's steps (a raised learning rate's)."""
        return result.trained

    def _drift_found(self, monitor: AnomalyMonitor, step: int) -> None:
        """This loop's detector found a drift after ``step``: act on it now."""
        self._drifted(monitor, step)

    def _drifted(self, monitor: AnomalyMonitor, step: int) -> None:
        """A drift: count and report it, tag the last snapshot before it, start the response."""
        now = time.time()
        monitor.note_drift(now, step)
        self.counts.drifts_detected += 1
        metrics = trainer_metrics(self.metrics)
        metrics.drift_detected.inc()
        metrics.record_drift_time(now)
        tagged = self.store.latest()
        if tagged is not None and self._writes_snapshots():
            self.store.tag(tagged, "pre-drift", {"detected_at": now, "detected_at_step": step})
        log.warning(
            "drift detected in the reference scores at step %d (%s); last snapshot before it: %s; "
            "response: %s",
            step,
            monitor.settings.drift_detector,
            tagged.path.name if tagged is not None else "(none yet)",
            monitor.response.name,
        )
        payload = {
            "kind": "drift",
            "step": step,
            "detector": monitor.settings.drift_detector,
            "detected_at": now,
            "drifts_detected": self.counts.drifts_detected,
            "tagged_snapshot": tagged.path.name if tagged is not None else None,
            "response": monitor.response.name,
            "adapt_records": monitor.adapt_left,
        }
        self.sink.send(metrics_message(self.publisher.topics.metrics, payload))
        self._run_change(monitor.response.on_drift(self.trainer))

    def _run_change(self, change: Change | None) -> None:
        if change is not None:
            self.pipeline.executor().submit(change)

    def _heldout_payload(self, step: int, x: np.ndarray, c: np.ndarray) -> dict[str, Any] | None:
        """Runs on the step thread, right after step ``step``."""
        assert self.evaluation is not None
        return heldout_payload(self.trainer, self.evaluation.importance_samples, step, x, c, self._rescored)

    def _rescored(self, bound: np.ndarray) -> None:
        """Runs on the step thread: the current parameters' ELBOs of the newest held-out records,
        which replace the anomaly reference at the next published step (a fresher reference than
        scores from the parameters of long ago)."""
        self._fresh_reference = bound.copy()

    def forget_positions(self) -> None:
        """Forget every partition's position, as for a source that starts anew."""
        self.stream.loop = LoopState(last_summary=self.state.last_summary)
        self.checkpoints.interval.offsets = {}
