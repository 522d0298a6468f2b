"""The online loop: decode, micro-batch, score-then-train, publish, and checkpoint in a fixed order.

Checkpoint commit order (the contract downstream users and restarts rely on):

    1. the open micro-batch is trained and its latents queued (nothing consumed is left pending);
    2. outputs flushed    -- every latent, metric and dead letter so far is acknowledged by the broker;
    3. snapshot durable   -- model, optimizer, step, RNG and next offsets are fsynced and renamed;
    4. offsets committed  -- the consumer group moves to the same offsets the snapshot holds.

A crash between any two steps loses nothing: on restart the newest valid snapshot is restored and
consumption resumes at *its* offsets, so no record is skipped and none is trained on twice; outputs
of records after the snapshot may be published again (at-least-once output), and how many is
counted (``streamvi_replayed_records_total``).

Exactly-once (``processing.guarantee: exactly_once``, a transactional sink) is a two-phase scheme:

    1. the open micro-batch is trained and its latents queued (into the open transaction);
    2. outputs flushed    -- acknowledged by the broker but invisible to read_committed consumers;
    3. snapshot durable   -- written *pending*: trusted only once step 4 has happened;
    4. transaction commit -- outputs and offsets become visible/committed in one atomic step;
    5. old snapshots pruned (never before 4: the previous trusted snapshot must survive a crash).

Crash windows: before 3, the transaction is aborted by the broker (or fenced by the restarted
producer) and no snapshot covers it: the restart redoes the interval from the previous snapshot.
Between 3 and 4, the newest snapshot's offsets are ahead of the group's committed offsets: on
restart it is discarded (its transaction never committed) and the previous one is restored, which
is exactly where the committed offsets are. After 4 the newest snapshot and the group agree. So
the group's committed offsets are the commit record of the two-phase scheme, and a read_committed
consumer sees each input's outputs once while the model is trained on each input once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tensorflow as tf

from streamvi.errors import StreamVIError
from streamvi.io.base import OutputSink, Partition, RawRecord, RecordSource
from streamvi.io.codecs import (
    DecodeError,
    RecordDecoder,
    dead_letter_message,
    latent_messages,
    metrics_message,
)
from streamvi.metrics import Health, Metrics
from streamvi.snapshots.compatibility import check_snapshot_matches
from streamvi.snapshots.store import SnapshotInfo, SnapshotStore, encode_offsets
from streamvi.training.batching import MicroBatcher
from streamvi.training.heldout import HeldOutReservoir
from streamvi.training.history import StepHistory
from streamvi.training.trainer import StepResult, Trainer

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    updates_skipped: int = 0
    records_skipped: int = 0

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
class ProcessingPolicy:
    """Delivery guarantee and fault handling (``processing.*``)."""

    exactly_once: bool = False
    max_nonfinite_in_a_row: int = 10
    #: Poll the source (partitions paused) this often while a step or snapshot is still running;
    #: None runs them inline with no keep-alive.
    keepalive_seconds: float | None = None
    retry_initial_seconds: float = 0.5
    retry_max_seconds: float = 10.0


@dataclass(frozen=True)
class _InFlight:
    """A submitted micro-batch: its buffer, its step on the step thread and, when one is due right
    after that step, the held-out evaluation queued behind it on the same thread."""

    batch: MicroBatcher
    step: concurrent.futures.Future[StepResult]
    heldout: concurrent.futures.Future[dict[str, Any] | None] | None = None


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
        processing: ProcessingPolicy | None = None,
        pipeline_depth: int = 2,
    ) -> None:
        if pipeline_depth < 1:
            raise ValueError("pipeline_depth must be at least 1")
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
        self.pipeline_depth = pipeline_depth
        # Preallocated batch buffers: one filling, up to ``pipeline_depth`` queued for or in the step.
        self._free_batchers = [
            MicroBatcher(
                trainer.batch_size, decoder.dim, max_batch_latency_seconds, context_dim=decoder.context_dim
            )
            for _ in range(pipeline_depth + 1)
        ]
        self.batcher = self._free_batchers.pop()
        self._pipeline: collections.deque[_InFlight] = collections.deque()
        self._submitted_step = trainer.step  # the step counter once every submitted step has run
        self.checkpoint = tf.train.Checkpoint(**trainer.checkpoint_objects())
        self.counts = LoopCounts()
        self.state = LoopState()
        self.history = StepHistory()
        self._last_checkpoint_time = time.monotonic()
        self._last_checkpoint_step = trainer.step
        self._finished_step = trainer.step
        self._last_checkpoint_offsets: dict[Partition, int] = {}
        self._last_lag_time = 0.0
        self.processing = processing or ProcessingPolicy()
        if self.processing.exactly_once and not sink.transactional:
            raise ValueError("exactly-once processing needs a transactional sink")
        self._trusted: SnapshotInfo | None = None  # the snapshot a rewind goes back to
        self._nonfinite_run = 0
        self._failures = 0  # consecutive failed checkpoints, for the back-off
        self._rewind_reason: str | None = None
        self._epoch = 0  # bumped by every rewind: records fetched before it are stale
        self._busy = False
        self._in_rebalance = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._progress: dict[Partition, int] = {}  # at-least-once: offsets whose outputs were sent
        self._replay_until: dict[Partition, int] = {}
        self._initial_state: Path | None = None
        self._warmed_up = False
        source.set_rebalance_callbacks(self._on_assigned, self._on_revoked)

    # -- start-up ----------------------------------------------------------------------------------
    def restore(self) -> SnapshotInfo | None:
        """Load the newest trusted snapshot (if any) and make the source resume at its offsets."""
        info = self._trusted_snapshot()
        if info is not None:
            self._load(info)
            log.info("restored snapshot %s at step %d, offsets %s", info.path.name, info.step, info.offsets)
        if not self.processing.exactly_once:
            self._count_replays(info)
        self._finished_step = self._last_checkpoint_step = self._submitted_step = self.trainer.step
        self._last_checkpoint_offsets = dict(self.state.next_offsets)
        self._trusted = info
        if info is None:
            # A rewind always needs a target: keep the initial state (it covers no offsets).
            self._initial_state = Path(tempfile.mkdtemp(prefix="streamvi-initial-"))
            self.checkpoint.write(str(self._initial_state / "state"))
        self.health.set(model_loaded=True)
        if self.metrics is not None:
            self.metrics.model_step.set(self.trainer.step)
        return info

    def _load(self, info: SnapshotInfo) -> None:
        self.store.restore(self.checkpoint, info)
        self.counts = LoopCounts.from_meta(info.meta)
        self.state.next_offsets = dict(info.offsets)
        self.state.last_summary = dict(info.meta.get("metrics", {}))
        self.history = StepHistory.from_meta(info.meta)
        self.source.set_start_offsets(info.offsets)

    def _trusted_snapshot(self) -> SnapshotInfo | None:
        """The newest valid snapshot; under exactly-once, the newest whose transaction committed.

        A snapshot is written before its transaction commits, and the transaction commits the
        snapshot's offsets for the group; so a snapshot whose offsets are ahead of the group's
        committed offsets belongs to a transaction that never committed, and is discarded.
        Each snapshot is checked against the config in force before it is restored or discarded.
        """
        if not self.processing.exactly_once:
            latest = self.store.latest()
            if latest is not None:
                self._check_matches_config(latest)
            return latest
        valid = list(self.store.valid())
        partitions = sorted({p for info in valid for p in info.offsets})
        committed = self.source.committed_offsets(partitions) if partitions else {}
        for info in valid:
            self._check_matches_config(info)
            ahead = {p: o for p, o in info.offsets.items() if o > committed.get(p, 0)}
            if ahead:
                reason = f"its transaction never committed (offsets {ahead}, group {committed})"
                self.store.discard(info, reason)
                continue
            behind = {p: c for p, c in committed.items() if p in info.offsets and c > info.offsets[p]}
            if behind:
                # Only when a newer trusted snapshot was lost (corrupt): outputs up to the committed
                # offsets are already visible, so resume there; the model misses those records.
                log.error(
                    "snapshot %s is behind the committed offsets %s (a newer snapshot was lost); "
                    "resuming at the committed offsets, the model skips the records in between",
                    info.path.name,
                    behind,
                )
                resumed = encode_offsets({**info.offsets, **behind})
                info = SnapshotInfo(info.path, dict(info.meta, offsets=resumed))
            return info
        return None

    def _check_matches_config(self, info: SnapshotInfo) -> None:
        """Refuse a snapshot written under other structural settings than the ones this loop's
        snapshots record (its checkpoint would not fit); without a config on either side, allow it."""
        config, snapshot_config = self.snapshot_meta.get("config"), info.meta.get("config")
        if isinstance(config, Mapping) and isinstance(snapshot_config, Mapping):
            check_snapshot_matches(info.path, snapshot_config, config)

    def _count_replays(self, info: SnapshotInfo | None) -> None:
        """At-least-once: the records between the snapshot and how far outputs were sent before the
        crash will be output again; they are counted as they are reprocessed."""
        sent = self.store.read_progress()
        start = dict(info.offsets) if info is not None else {}
        missing = [p for p in sent if p not in start]
        if missing:
            start.update(self.source.committed_offsets(missing))
        self._replay_until = {p: o for p, o in sent.items() if o > start.get(p, 0)}
        self._progress = dict(sent)
        if self._replay_until:
            total = sum(o - start.get(p, 0) for p, o in self._replay_until.items())
            log.warning("up to %d records after the last snapshot will be output again", total)

    # -- rebalance hooks (called from inside source.poll on this thread) ---------------------------
    def _on_assigned(self, partitions: Sequence[Partition]) -> None:
        self.health.set(partitions_assigned=bool(self.source.assignment()) or bool(partitions))

    def _on_revoked(self, partitions: Sequence[Partition]) -> None:
        if partitions and self._busy:
            # Revoked while a step or snapshot runs (during a keep-alive poll): this interval can no
            # longer be committed, so it is rolled back as soon as that operation returns.
            self._rewind_reason = "partitions revoked during a long step or snapshot"
        elif partitions:
            self._in_rebalance = True  # no keep-alive polls from inside this poll's callback
            try:
                self.run_checkpoint(reason="rebalance")
            finally:
                self._in_rebalance = False
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
        if not self._warmed_up:
            # Compile the step on the step thread while the first polls join the group.
            self._warmed_up = True
            self._step_thread().submit(self._warm_up)
        while not stop.is_set():
            if max_records is not None and consumed_here >= max_records:
                break
            self._publish_finished()  # as soon as steps are done, even if input is idle
            wait = self.batcher.time_left()
            timeout = 0.2 if wait is None else min(0.2, wait)
            if self._pipeline:
                timeout = min(timeout, 0.005)
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
            # A partial batch past its latency bound goes as soon as the step thread is idle; while
            # steps are queued it keeps filling, since it could not start any sooner.
            if self.batcher.due() and not self._pipeline:
                self._submit_batch()
            if self._checkpoint_due():
                self.run_checkpoint(reason="interval")
            if now - self._last_lag_time >= self.lag_interval_seconds:
                self._update_lag()
                self._last_lag_time = now
        self.run_checkpoint(reason="shutdown")
        self._update_lag()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._initial_state is not None:
            shutil.rmtree(self._initial_state, ignore_errors=True)
            self._initial_state = None
        return self.counts

    def _handle(self, records: list[RawRecord]) -> None:
        """Decode a fetch at once and move it into micro-batches, a block of rows at a time.

        A record counts as consumed once it is in a micro-batch or on its way to the dead-letter
        topic; a checkpoint always drains the batches first, so the offset never runs ahead of training.
        """
        if self.metrics is not None:
            self.metrics.records_consumed.inc(len(records))
        self.counts.records_consumed += len(records)
        if self._replay_until:
            self._note_replays(records)
        epoch = self._epoch
        decoded = self.decoder.decode_many(records)
        errors = decoded.errors
        train = np.ones(len(records), dtype=np.float32)
        if self.evaluation is not None:
            reservoir = self.evaluation.reservoir
            for i, record in enumerate(records):
                if errors[i] is None and reservoir.selects(record):
                    train[i] = 0.0
                    reservoir.add(decoded.x[i], decoded.c[i])
        start, n = 0, len(records)
        while start < n:
            if self._epoch != epoch:
                return  # rewound: the rest of this fetch is stale and will be fetched again
            # The next block: as many records as fill the open batch with valid rows.
            room = self.batcher.room
            good: Sequence[int]
            if decoded.all_valid:
                end = min(n, start + room)
                good = range(start, end)
            else:
                good_list: list[int] = []
                end = start
                while end < n and len(good_list) < room:
                    error = errors[end]
                    if error is None:
                        good_list.append(end)
                    else:
                        self._dead_letter(records[end], error)
                    end += 1
                good = good_list
            self._advance(records[start:end])
            if len(good) == end - start:
                rows: slice | list[int] = slice(start, end)
                block = records[start:end]
                ids = decoded.record_ids[start:end]
            else:
                rows = list(good)
                block = [records[i] for i in good]
                ids = [decoded.record_ids[i] for i in good]
            opened = self._appended_at(block[0]) if block and not len(self.batcher) else None
            self.batcher.add_rows(block, decoded.x[rows], ids, decoded.c[rows], train[rows], now=opened)
            start = end
            if self.batcher.full:
                self._submit_batch()
                if self._checkpoint_due():
                    self.run_checkpoint(reason="interval")
        if not self.processing.exactly_once and self._epoch == epoch:
            self.store.write_progress(self._progress)

    def _appended_at(self, record: RawRecord) -> float:
        """When ``record`` was appended, on the monotonic clock: a batch's latency bound counts from
        its first record's append, so time spent reaching the daemon is inside the bound. The age
        from the record's timestamp is clamped to [0, bound]: a skewed clock or an old record can
        only make a batch close sooner, never later than the bound after it arrived."""
        now = time.monotonic()
        if record.timestamp_ms < 0:
            return now
        age = time.time() - record.timestamp_ms / 1000.0
        return now - min(max(age, 0.0), self.batcher.max_latency_seconds)

    def _advance(self, records: Sequence[RawRecord]) -> None:
        """Move the next offsets past ``records`` (a fetch is in offset order per partition)."""
        self.state.next_offsets.update({(r.topic, r.partition): r.offset + 1 for r in records})

    def _sent(self, records: Sequence[RawRecord]) -> None:
        """At-least-once bookkeeping: the outputs of ``records`` are on their way (may be published)."""
        progress = self._progress
        # Records are in offset order per partition, so the last one of each partition is its furthest.
        for partition, end in {(r.topic, r.partition): r.offset + 1 for r in records}.items():
            if end > progress.get(partition, 0):
                progress[partition] = end

    def _note_replays(self, records: list[RawRecord]) -> None:
        replayed = 0
        for record in records:
            until = self._replay_until.get((record.topic, record.partition))
            if until is not None and record.offset < until:
                replayed += 1
        for (topic, partition), until in list(self._replay_until.items()):
            if any(r.topic == topic and r.partition == partition and r.offset >= until - 1 for r in records):
                del self._replay_until[(topic, partition)]
        if replayed and self.metrics is not None:
            self.metrics.replayed_records.inc(replayed)

    def _dead_letter(self, record: RawRecord, error: DecodeError) -> None:
        log.debug("dead letter %s:%d@%d: %s", record.topic, record.partition, record.offset, error)
        self.sink.send(dead_letter_message(record, self.topics.dead_letter, error))
        self._sent((record,))
        self.counts.dead_letters += 1
        if self.metrics is not None:
            self.metrics.dead_letters.labels(reason=error.reason).inc()

    # -- the step pipeline -------------------------------------------------------------------------
    # The loop's thread fetches, decodes, assembles micro-batches and publishes; one step thread
    # trains. Between them, up to ``pipeline_depth`` submitted batches wait for or run in the step
    # (a bounded queue: the executor's). When it is full, the loop waits for the oldest step and
    # stops fetching, so the client's own bounded prefetch fills and the broker holds the rest; if
    # the wait outlasts ``keepalive_seconds``, partitions are paused and the consumer polled so it
    # stays in its group. Outputs are published in submission order, as each step finishes.

    def _train_batch(self) -> None:
        """Train the open batch and publish every submitted step before returning (checkpoints
        drain this way)."""
        self._submit_batch()
        self._drain()

    def _submit_batch(self) -> None:
        """Queue the open batch for the step thread and return at once (after waiting for room).

        A held-out evaluation due after this step is queued right behind it on the step thread, so
        it sees exactly the parameters of that step and never overlaps one.
        """
        if len(self.batcher) == 0 or self._rewind_reason is not None:
            return
        epoch = self._epoch
        while len(self._pipeline) >= self.pipeline_depth:
            self._complete_oldest()
            if self._epoch != epoch:
                return  # rewound while waiting: the open batch was dropped
        batch = self.batcher
        n = len(batch)
        rows = batch.padded()
        executor = self._step_thread()
        step = executor.submit(self.trainer.train_rows, rows, n)
        heldout = None
        if batch.weights[:n].any():  # a step that trains advances the step counter by one
            self._submitted_step += 1
            evaluation = self.evaluation
            if evaluation is not None and self._submitted_step % evaluation.every_steps == 0:
                held_x, held_c = (a.copy() for a in evaluation.reservoir.contents())
                heldout = executor.submit(self._heldout_payload, self._submitted_step, held_x, held_c)
        self._pipeline.append(_InFlight(batch, step, heldout))
        self.batcher = self._free_batchers.pop()

    def _publish_finished(self) -> None:
        """Publish every step at the head of the pipeline that has finished (never waits)."""
        while self._pipeline and self._pipeline[0].step.done():
            heldout = self._pipeline[0].heldout
            if heldout is not None and not heldout.done():
                return
            self._complete_oldest()

    def _drain(self) -> None:
        """Wait for every submitted step and publish it."""
        epoch = self._epoch
        while self._pipeline and self._epoch == epoch:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        """Wait for the oldest submitted step (keeping the consumer alive), free its buffer and
        publish its outputs; a pending rewind is carried out instead."""
        entry = self._pipeline.popleft()
        result = self._wait(entry.step)
        heldout = self._wait(entry.heldout) if entry.heldout is not None else None
        batch = entry.batch
        records, record_ids = batch.records, batch.record_ids
        batch.clear()
        self._free_batchers.append(batch)
        if self._rewind_reason is not None:
            self._rewind(self._rewind_reason)
            return
        self._finished_step = result.step
        self._publish(records, record_ids, result, heldout)
        if self._nonfinite_run >= self.processing.max_nonfinite_in_a_row:
            self._drain()  # the steps queued behind it ran on the diverged parameters
            if self._nonfinite_run >= self.processing.max_nonfinite_in_a_row:
                self._recover_from_divergence()

    def _publish(
        self,
        records: list[RawRecord],
        record_ids: list[str | None],
        result: StepResult,
        heldout: dict[str, Any] | None,
    ) -> None:
        """Send a finished batch's latents and step metrics (and a held-out evaluation run right
        after its step), and account for its step."""
        n = len(records)
        scores = result.scores
        self.sink.send_many(
            latent_messages(
                self.topics.latents,
                records,
                record_ids,
                scores.z_loc,
                scores.z_scale,
                scores.bound,
                result.step - 1 if result.trained else result.step,  # the parameters that scored it
                self.trainer.estimator.bound_name,
            )
        )
        self._sent(records)
        self.counts.latents_published += n
        if self.metrics is not None:
            self.metrics.latents_published.inc(n)
        if not result.trained:
            return
        self.counts.steps += 1
        if result.applied:
            self.counts.records_trained += result.trained_records
            self._nonfinite_run = 0
        else:
            self.counts.updates_skipped += 1
            self.counts.records_skipped += n
            self._nonfinite_run += 1
            log.warning("step %d: non-finite loss or gradient, update skipped", result.step)
        summary = result.summary()
        self.state.last_summary = summary
        self.history.add(result.step, summary)
        self.sink.send(metrics_message(self.topics.metrics, self._step_payload(result, summary)))
        self._record_step_metrics(result, summary)
        if heldout is not None:
            self._publish_heldout(heldout)

    def _warm_up(self) -> None:
        """Trace and compile the step ahead of the first batch (runs on the step thread). A failure
        is only logged: the first real step meets the same error and reports it."""
        try:
            seconds = self.trainer.warm_up()
        except Exception:
            log.exception("compiling the training step ahead of the first batch failed")
            return
        log.info("training step compiled in %.2fs", seconds)
        if self.metrics is not None:
            self.metrics.step_compile.set(seconds)

    def _heldout_payload(self, step: int, x: np.ndarray, c: np.ndarray) -> dict[str, Any] | None:
        """Held-out ELBO and importance-weighted log-likelihood on the reservoir's rows (no update);
        runs on the step thread, right after step ``step``."""
        assert self.evaluation is not None
        if x.shape[0] == 0:
            return None
        k = self.evaluation.importance_samples
        return {
            "kind": "heldout",
            "step": step,
            "records": int(x.shape[0]),
            "bound": self.trainer.estimator.bound_name,
            "elbo": float(np.mean(self.trainer.evaluate(x, c).bound)),
            "log_likelihood": float(np.mean(self.trainer.log_likelihood(x, c, k))),
            "importance_samples": k,
            "wall_time": time.time(),
        }

    def _publish_heldout(self, payload: dict[str, Any]) -> None:
        self.state.last_heldout = payload
        self.sink.send(metrics_message(self.topics.metrics, payload))
        if self.metrics is not None:
            self.metrics.heldout_elbo.set(payload["elbo"])
            self.metrics.heldout_log_likelihood.set(payload["log_likelihood"])
            self.metrics.heldout_records.set(payload["records"])

    def _recover_from_divergence(self) -> None:
        """Too many non-finite updates in a row: reload the parameters and optimizer state of the
        last trusted snapshot (the step counter, RNG and offsets go on) and raise the alert gauge."""
        info = self._trusted
        log.error(
            "%d non-finite updates in a row: restoring the model from snapshot %s",
            self._nonfinite_run,
            info.path.name if info is not None else "(none)",
        )
        if info is not None:
            partial = tf.train.Checkpoint(
                model=self.trainer.model, estimator=self.trainer.estimator, optimizer=self.trainer.optimizer
            )
            self.store.restore(partial, info, partial=True)
        self._nonfinite_run = 0
        if self.metrics is not None:
            self.metrics.training_diverged.set(1)

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
            "update_skipped": not result.applied,
            "clipped": result.clipped,
            "wall_time": time.time(),
            "records_trained": self.counts.records_trained,
        }

    def _record_step_metrics(self, result: StepResult, summary: dict[str, float]) -> None:
        m = self.metrics
        if m is None:
            return
        if result.applied:
            m.records_trained.inc(result.trained_records)
        else:
            m.nonfinite_updates.inc()
        m.train_steps.inc()
        m.model_step.set(result.step)
        m.elbo.set(summary["elbo"])
        m.kl.set(summary["kl"])
        m.reconstruction.set(summary["reconstruction"])
        m.gradient_norm.set(result.grad_norm)
        if result.clipped:
            m.gradient_clipped.inc()
        m.learning_rate.set(result.learning_rate)
        m.step_duration.observe(result.duration_seconds)
        m.batch_size.observe(result.scores.size)

    # -- checkpoints -------------------------------------------------------------------------------
    def _checkpoint_due(self) -> bool:
        # Finished steps only: the step counter of one still in flight is the step thread's business.
        steps = self._finished_step - self._last_checkpoint_step
        if steps >= self.policy.every_steps:
            return True
        elapsed = time.monotonic() - self._last_checkpoint_time
        return elapsed >= self.policy.every_seconds and self._has_progress()

    def _has_progress(self) -> bool:
        return (
            len(self.batcher) > 0
            or bool(self._pipeline)
            or self._finished_step != self._last_checkpoint_step
            or self.state.next_offsets != self._last_checkpoint_offsets
        )

    def run_checkpoint(self, reason: str) -> SnapshotInfo | None:
        """Drain, flush outputs, write the snapshot, then commit offsets -- in that order, always.

        Returns None when there was nothing to do, or when delivering failed and the loop rewound
        to the last trusted snapshot (the interval is then consumed and processed again).
        """
        if not self._has_progress():
            self._last_checkpoint_time = time.monotonic()
            return None
        started = time.perf_counter()
        exactly_once = self.processing.exactly_once
        # 1. nothing consumed stays pending: train the open micro-batch now.
        epoch = self._epoch
        self._train_batch()
        if self._epoch != epoch:
            return None
        # 2. outputs flushed: every latent, metric and dead letter is acknowledged (under
        #    exactly-once, still invisible to read_committed consumers).
        try:
            self.sink.flush()
        except StreamVIError as exc:
            self._rewind(f"outputs were not delivered: {exc}")
            return None
        if not exactly_once:
            self.store.write_progress(self._progress)
        # 3. snapshot durable: model + optimizer + step + RNG + the offsets it covers. Under
        #    exactly-once it is pending (and the older ones are kept) until step 4 commits.
        offsets = dict(self.state.next_offsets)
        self.counts.snapshots += 1
        meta = self._meta(offsets)
        step = self.trainer.step
        if exactly_once:
            info = self._guarded(lambda: self.store.write(self.checkpoint, step, meta, prune=False))
        else:
            info = self._guarded(lambda: self.store.write(self.checkpoint, step, meta))
        if self._rewind_reason is not None:
            if exactly_once:
                self.store.discard(info, "partitions revoked before its transaction committed")
            self._rewind(self._rewind_reason)
            return None
        # 4. offsets committed: the group now agrees with the snapshot; under exactly-once the
        #    outputs become visible in the same atomic step, which makes the snapshot trusted.
        try:
            if exactly_once:
                self.sink.commit_transaction(offsets, self.source.group_metadata())
            else:
                self.source.commit(offsets)
        except StreamVIError as exc:
            if exactly_once:
                # Not committed: the transaction is aborted and this snapshot must never be used.
                self.store.discard(info, f"its transaction failed to commit: {exc}")
                self._rewind(f"the transaction failed to commit: {exc}")
                return None
            # At-least-once: the snapshot is durable and a restart resumes at its offsets; the group
            # catches up at the next checkpoint.
            log.warning("committing offsets failed (the snapshot is durable, retrying later): %s", exc)
        # 5. older snapshots go only now, so a trusted one always survives.
        if exactly_once:
            self.store.prune()
        self._trusted = info
        self._failures = 0
        self._last_checkpoint_time = time.monotonic()
        self._finished_step = self._last_checkpoint_step = self.trainer.step
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
            guarantee="exactly_once" if self.processing.exactly_once else "at_least_once",
        )

    # -- fault handling ----------------------------------------------------------------------------
    def _step_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        """The one worker thread that runs steps and snapshot writes (TensorFlow releases the GIL,
        so decoding and publishing on the loop's thread overlap with it)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamvi-step")
        return self._executor

    def _guarded(self, operation: Callable[[], T]) -> T:
        """Run a step or snapshot write; if it takes longer than ``keepalive_seconds``, poll the
        source meanwhile (partitions paused, nothing fetched) so the consumer stays in its group."""
        if self.processing.keepalive_seconds is None:
            return operation()
        return self._wait(self._step_thread().submit(operation))

    def _wait(self, future: concurrent.futures.Future[T]) -> T:
        """The result of work on the step thread, keeping the consumer alive while it runs."""
        interval = self.processing.keepalive_seconds
        if interval is None or self._in_rebalance:
            return future.result()
        done, _ = concurrent.futures.wait([future], timeout=interval)
        if not done:
            self._busy = True
            try:
                while not done:
                    self.source.keepalive()
                    done, _ = concurrent.futures.wait([future], timeout=interval)
            finally:
                self._busy = False
        return future.result()

    def _rewind(self, reason: str) -> None:
        """Go back to the last trusted snapshot: abort the open transaction (exactly-once), drop the
        open batch, restore the model and re-read the input from the snapshot's offsets, after a
        back-off. Nothing is lost: every record after the snapshot is consumed again."""
        self._rewind_reason = None
        self._epoch += 1
        self._failures += 1
        delay = min(
            self.processing.retry_max_seconds,
            self.processing.retry_initial_seconds * 2 ** (self._failures - 1),
        )
        log.error("rewinding to the last snapshot in %.1fs: %s", delay, reason)
        time.sleep(delay)
        if self.processing.exactly_once:
            try:
                self.sink.abort_transaction()
            except StreamVIError as exc:
                log.warning("aborting the transaction failed (it will time out on the broker): %s", exc)
        while self._pipeline:  # steps still queued or running belong to the abandoned interval
            entry = self._pipeline.popleft()
            futures: list[concurrent.futures.Future[Any]] = [entry.step]
            if entry.heldout is not None:
                futures.append(entry.heldout)
            concurrent.futures.wait([f for f in futures if not f.cancel()])
            entry.batch.clear()
            self._free_batchers.append(entry.batch)
        self.batcher.clear()
        info = self._trusted
        if info is not None:
            self._load(info)
        elif self._initial_state is not None:
            self.checkpoint.read(str(self._initial_state / "state")).assert_consumed()
            self.counts = LoopCounts()
            self.state = LoopState()
        self.source.seek(self.state.next_offsets)
        if not self.processing.exactly_once:
            start = self.state.next_offsets
            self._replay_until = {p: o for p, o in self._progress.items() if o > start.get(p, 0)}
        self._finished_step = self._last_checkpoint_step = self._submitted_step = self.trainer.step
        self._last_checkpoint_offsets = dict(self.state.next_offsets)

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
