"""Checkpoints: the offsets of one interval, when it is due, and its commit in the documented order.

Trainer commit order (the contract downstream users and restarts rely on):

    1. the open micro-batch is trained and its latents queued (nothing consumed is left pending);
    2. outputs flushed    -- every latent, metric and dead letter so far is acknowledged by the broker;
    3. snapshot durable   -- model, optimizer, step, RNG and next offsets (and the held-out
                             sample) are fsynced and renamed;
    4. offsets committed  -- the consumer group moves to the same offsets the snapshot holds
                             (exactly-once: one transaction commits the outputs and the offsets);
    5. exactly-once only: older snapshots pruned (never before 4: a trusted one must survive).

A crash between any two steps loses nothing: on restart the newest trusted snapshot is restored
and consumption resumes at *its* offsets. The guarantee-specific parts of steps 2-5 are the
committer's (streamvi/stream/committers.py).

Encoder-replica commit order (:class:`OffsetCommits`; a replica writes no snapshot):

    1. the open micro-batch is encoded and its latents queued;
    2. outputs flushed    -- every latent and dead letter so far is acknowledged by the broker;
    3. offsets committed  -- the replica's group moves past every record whose latents were flushed
                             (exactly-once: one transaction commits the interval's outputs and offsets).

A crash between 2 and 3 re-encodes the interval after a restart (at-least-once: the latents are
published again, the same ones for the same snapshot; exactly-once: the open transaction is aborted
and its outputs never become visible).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import tensorflow as tf

from streamvi.errors import StreamVIError
from streamvi.io.base import OutputSink, Partition, RecordSource
from streamvi.snapshots.store import SnapshotInfo, encode_offsets
from streamvi.stream.committers import Committer
from streamvi.stream.pipeline import StepPipeline
from streamvi.stream.state import CheckpointPolicy, StreamState
from streamvi.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class Interval:
    """Where the current checkpoint interval started: its time, step and offsets."""

    step: int
    offsets: dict[Partition, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)


class IntervalClock:
    """When the current interval's checkpoint is due: ``every_steps`` published steps, or
    ``every_seconds`` with progress made (records consumed, batches queued or steps published)."""

    def __init__(
        self, policy: CheckpointPolicy, pipeline: StepPipeline, state: Callable[[], StreamState], step: int
    ):
        self.policy = policy
        self.pipeline = pipeline
        self._state = state
        self.interval = Interval(step)
        #: The step of the newest published step (a step still in flight is the step thread's).
        self.finished_step = step

    def restart_at(self, step: int, offsets: dict[Partition, int]) -> None:
        self.finished_step = step
        self.interval = Interval(step, dict(offsets))

    def forget(self, partitions: Sequence[Partition]) -> None:
        """Revoked partitions leave the interval: their offsets are no longer ours to commit."""
        for partition in partitions:
            self.interval.offsets.pop(partition, None)

    def has_progress(self) -> bool:
        return (
            len(self.pipeline.batcher) > 0
            or len(self.pipeline) > 0
            or self.finished_step != self.interval.step
            or self._state().loop.next_offsets != self.interval.offsets
        )

    def due(self) -> bool:
        if self.finished_step - self.interval.step >= self.policy.every_steps:
            return True
        elapsed = time.monotonic() - self.interval.started_at
        return elapsed >= self.policy.every_seconds and self.has_progress()


class Checkpoints(IntervalClock):
    """The trainer's checkpoints: decides when one is due and runs it; a failure to deliver or
    commit rewinds."""

    def __init__(
        self,
        *,
        policy: CheckpointPolicy,
        committer: Committer,
        sink: OutputSink,
        trainer: Trainer,
        checkpoint: tf.train.Checkpoint,
        pipeline: StepPipeline,
        state: Callable[[], StreamState],
        snapshot_meta: dict[str, Any],
        snapshot_files: Callable[[], dict[str, bytes]] | None = None,
        drain: Callable[[], bool],
        rewind: Callable[[str, bool], None],
        pending_rewind: Callable[[], str | None],
        trusted: Callable[[SnapshotInfo], None],
        metrics: Any,
    ) -> None:
        super().__init__(policy, pipeline, state, trainer.step)
        self.committer = committer
        self.sink = sink
        self.trainer = trainer
        self.checkpoint = checkpoint
        self.snapshot_meta = snapshot_meta
        self._snapshot_files = snapshot_files or dict
        self._drain = drain
        self._rewind = rewind
        self._pending_rewind = pending_rewind
        self._trusted = trusted
        self.metrics = metrics

    def restart(self, offsets: dict[Partition, int]) -> None:
        """A new interval from the trainer's current step and ``offsets`` (start-up, rewind)."""
        self.restart_at(self.trainer.step, offsets)

    def run(self, reason: str) -> SnapshotInfo | None:
        """Drain, flush outputs, write the snapshot, then commit offsets -- in that order, always.

        Returns None when there was nothing to do, or when delivering failed and the loop rewound
        to the last trusted snapshot (the interval is then consumed and processed again).
        """
        if not self.has_progress():
            self.interval.started_at = time.monotonic()
            return None
        started = time.perf_counter()
        # 1. nothing consumed stays pending: train the open micro-batch now and publish every step.
        if not self._drain():
            return None
        # 2. outputs flushed: every latent, metric and dead letter is acknowledged (under
        #    exactly-once, still invisible to read_committed consumers).
        try:
            self.sink.flush()
        except StreamVIError as exc:
            self._rewind(f"outputs were not delivered: {exc}", False)
            return None
        self.committer.outputs_flushed()
        # 3. snapshot durable: model + optimizer + step + RNG + the offsets it covers.
        state = self._state()
        offsets = dict(state.loop.next_offsets)
        state.counts.snapshots += 1
        meta = self._meta(state, offsets)
        files = self._snapshot_files()  # read here, on the loop thread that fills them
        step = self.trainer.step
        info = self.pipeline.run_guarded(
            lambda: self.committer.write_snapshot(self.checkpoint, step, meta, files)
        )
        pending = self._pending_rewind()
        if pending is not None:
            self.committer.snapshot_abandoned(info)
            self._rewind(pending, True)  # a rebalance during a long step: routine
            return None
        # 4. offsets committed: the group now agrees with the snapshot (exactly-once: the outputs
        #    become visible in the same atomic step, which makes the snapshot trusted).
        failure = self.committer.commit(info, offsets)
        if failure is not None:
            self._rewind(failure, False)
            return None
        # 5. the guarantee's clean-up (exactly-once: prune the older snapshots only now).
        self.committer.committed()
        self._trusted(info)
        self.restart(offsets)
        self.metrics.snapshots.inc()
        self.metrics.snapshot_duration.observe(time.perf_counter() - started)
        self.metrics.last_snapshot.set(time.time())
        self.metrics.commits.inc()
        log.info("checkpoint (%s): step %d, snapshot %s", reason, self.trainer.step, info.path.name)
        return info

    def _meta(self, state: StreamState, offsets: dict[Partition, int]) -> dict[str, Any]:
        return dict(
            self.snapshot_meta,
            offsets=encode_offsets(offsets),
            counts=asdict(state.counts),
            metrics=state.loop.last_summary,
            heldout=state.loop.last_heldout,
            estimator=self.trainer.estimator.name,
            bound=self.trainer.estimator.bound_name,
            history=state.history.to_json(),
            guarantee=self.committer.guarantee,
        )


class OffsetCommits(IntervalClock):
    """An encoder replica's checkpoints: drain, flush outputs, commit offsets (no snapshot).

    At-least-once commits through the consumer (a failure is retried at the next interval: the
    outputs are durable, a restart only encodes the interval again); exactly-once commits the
    interval's outputs and offsets in one transaction, and a failure rewinds to the committed offsets.
    """

    def __init__(
        self,
        *,
        policy: CheckpointPolicy,
        exactly_once: bool,
        source: RecordSource,
        sink: OutputSink,
        pipeline: StepPipeline,
        state: Callable[[], StreamState],
        drain: Callable[[], bool],
        rewind: Callable[[str, bool], None],
        pending_rewind: Callable[[], str | None],
        committed: Callable[[], None],
        metrics: Any,
    ) -> None:
        super().__init__(policy, pipeline, state, 0)
        self.exactly_once = exactly_once
        self.source = source
        self.sink = sink
        self._drain = drain
        self._rewind = rewind
        self._pending_rewind = pending_rewind
        self._committed = committed
        self.metrics = metrics

    def restart(self, offsets: dict[Partition, int]) -> None:
        self.restart_at(self.finished_step, offsets)

    def run(self, reason: str) -> SnapshotInfo | None:
        """Encode and publish what is queued, flush, then commit the offsets it covers; always None
        (a replica writes no snapshot)."""
        if not self.has_progress():
            self.interval.started_at = time.monotonic()
            return None
        # 1. nothing consumed stays pending.
        if not self._drain():
            return None
        # 2. outputs flushed.
        try:
            self.sink.flush()
        except StreamVIError as exc:
            self._rewind(f"outputs were not delivered: {exc}", False)
            return None
        pending = self._pending_rewind()
        if pending is not None:
            self._rewind(pending, True)  # a rebalance during a long step: routine
            return None
        # 3. offsets committed (exactly-once: together with the outputs, in one transaction).
        offsets = dict(self._state().loop.next_offsets)
        if offsets:
            try:
                if self.exactly_once:
                    self.sink.commit_transaction(offsets, self.source.group_metadata())
                else:
                    self.source.commit(offsets)
            except StreamVIError as exc:
                if self.exactly_once:
                    self._rewind(f"the transaction failed to commit: {exc}", False)
                    return None
                log.warning("committing offsets failed (outputs are delivered; retrying later): %s", exc)
                self.interval.started_at = time.monotonic()
                return None
            self.metrics.commits.inc()
            self._committed()
        log.debug("offsets committed (%s): %s", reason, offsets)
        self.restart(offsets)
        return None
