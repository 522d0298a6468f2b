"""Recovery: restoring the trusted snapshot, rewinding to it after a failure, and divergence restore.

A rewind drops everything after the last trusted snapshot (open transaction, queued steps, the
open batch), restores the model and re-reads the input from the snapshot's offsets after a
back-off: nothing is lost, every record after the snapshot is consumed again. Too many non-finite
updates in a row restore only the model's parameters and optimizer state (through the trainer's
own checkpoint objects); the step counter, RNG and offsets go on.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import tensorflow as tf

from streamvi.io.base import Partition, RecordSource
from streamvi.snapshots.store import SnapshotInfo, SnapshotStore
from streamvi.stream.committers import Committer
from streamvi.stream.pipeline import StepPipeline
from streamvi.stream.progress import OutputProgress
from streamvi.stream.state import LoopCounts, LoopState, ProcessingPolicy, StreamState
from streamvi.training.trainer import StepResult, Trainer

log = logging.getLogger(__name__)


class RewindBackoff:
    """What every role's rewind shares: the epoch that marks fetched records stale, the rewind
    pending behind a running step, and the back-off between consecutive failed checkpoints
    (``processing.retry_initial_seconds``, doubling up to ``retry_max_seconds``)."""

    def __init__(self, processing: ProcessingPolicy) -> None:
        self.processing = processing
        #: Bumped by every rewind: records fetched before it are stale.
        self.epoch = 0
        #: A rewind to carry out as soon as the running step or snapshot returns.
        self.pending: str | None = None
        self._failures = 0  # consecutive failed checkpoints, for the back-off

    def begin_rewind(self, reason: str, target: str, routine: bool = False) -> None:
        """Start a rewind to ``target``: a new epoch, then wait out the back-off. ``routine``: an
        expected event (a rebalance) logs a warning, a failure an error."""
        self.pending = None
        self.epoch += 1
        self._failures += 1
        delay = min(
            self.processing.retry_max_seconds,
            self.processing.retry_initial_seconds * 2 ** (self._failures - 1),
        )
        level = logging.WARNING if routine else logging.ERROR
        log.log(level, "rewinding to %s in %.1fs: %s", target, delay, reason)
        time.sleep(delay)

    def checkpoint_committed(self) -> None:
        """A checkpoint committed: the back-off starts again from its first delay."""
        self._failures = 0


class Recovery(RewindBackoff):
    """Owns what a failure goes back to (the trusted snapshot, or the initial state) and how."""

    def __init__(
        self,
        *,
        processing: ProcessingPolicy,
        trainer: Trainer,
        checkpoint: tf.train.Checkpoint,
        store: SnapshotStore,
        source: RecordSource,
        pipeline: StepPipeline,
        committer: Committer,
        progress: OutputProgress,
        metrics: Any,
    ) -> None:
        super().__init__(processing)
        self.trainer = trainer
        self.checkpoint = checkpoint
        self.store = store
        self.source = source
        self.pipeline = pipeline
        self.committer = committer
        self.progress = progress
        self.metrics = metrics
        #: The snapshot a rewind goes back to.
        self.trusted: SnapshotInfo | None = None
        self._nonfinite_run = 0
        self._initial_state: Path | None = None

    # -- start-up ----------------------------------------------------------------------------------
    #: A rewind can find the group's committed offsets past the trusted snapshot: only trainer
    #: workers, some of which may have committed a snapshot the others did not. One trainer's
    #: commits never pass its trusted snapshot, so its rewinds (often in a broker outage) do not ask.
    committed_may_pass_trusted = False

    def load(self, info: SnapshotInfo, at_start: bool = True) -> StreamState:
        """Restore ``info`` into the trainer and point the source at its offsets."""
        self.store.restore(self.checkpoint, info)
        start = self._start_offsets(info, at_start or self.committed_may_pass_trusted)
        self.source.set_start_offsets(start)
        return StreamState.from_meta(info.meta, start)

    def _start_offsets(self, info: SnapshotInfo, ask_group: bool) -> dict[Partition, int]:
        """The snapshot's offsets; under exactly-once, also where outputs are already visible.

        A transaction may have committed past the snapshot (trainer workers of which only some
        committed the next one, or a newer snapshot lost): the records in between are trained
        again, as the snapshot has not learnt from them, but their outputs are withheld.
        """
        start = dict(info.offsets)
        if self.processing.exactly_once and ask_group and start:
            self.progress.outputs_visible(start, self.source.committed_offsets(sorted(start)))
        return start

    def start_from(self, info: SnapshotInfo | None) -> None:
        """Remember what a rewind goes back to; with no snapshot, the initial state (no offsets)."""
        self.trusted = info
        if info is None:
            self._initial_state = Path(tempfile.mkdtemp(prefix="streamvi-initial-"))
            self.checkpoint.write(str(self._initial_state / "state"))

    def close(self) -> None:
        if self._initial_state is not None:
            shutil.rmtree(self._initial_state, ignore_errors=True)
            self._initial_state = None

    # -- checkpoints ---------------------------------------------------------------------------------
    def committed(self, info: SnapshotInfo) -> None:
        """A checkpoint committed: ``info`` is the new rewind target and the back-off resets."""
        self.trusted = info
        self.checkpoint_committed()

    # -- rewind --------------------------------------------------------------------------------------
    def rewind(self, reason: str, state: StreamState, routine: bool = False) -> StreamState:
        """Go back to the trusted snapshot (or the initial state) and return the state to go on with."""
        self.begin_rewind(reason, "the last snapshot", routine)
        self.committer.abort()
        self.pipeline.cancel()  # steps still queued or running belong to the abandoned interval
        if self.trusted is not None:
            state = self.load(self.trusted, at_start=False)
        elif self._initial_state is not None:
            self.checkpoint.read(str(self._initial_state / "state")).assert_consumed()
            state = StreamState(LoopCounts(), LoopState(), state.history)
        self.source.seek(state.loop.next_offsets)
        if not self.processing.exactly_once:
            self.progress.rewind_to(state.loop.next_offsets)
        self.pipeline.submitted_step = self.trainer.step
        return state

    # -- divergence ----------------------------------------------------------------------------------
    def note_step(self, result: StepResult) -> None:
        """Count non-finite updates in a row (a trained step whose update was skipped)."""
        if result.trained:
            self._nonfinite_run = 0 if result.applied else self._nonfinite_run + 1

    @property
    def diverged(self) -> bool:
        return self._nonfinite_run >= self.processing.max_nonfinite_in_a_row

    def recover_from_divergence(self) -> None:
        """Too many non-finite updates in a row: reload the parameters and optimizer state of the
        last trusted snapshot (the step counter, RNG and offsets go on) and raise the alert gauge."""
        info = self.trusted
        log.error(
            "%d non-finite updates in a row: restoring the model from snapshot %s",
            self._nonfinite_run,
            info.path.name if info is not None else "(none)",
        )
        if info is not None:
            objects = self.trainer.checkpoint_objects()
            partial = tf.train.Checkpoint(
                model=objects["model"], estimator=objects["estimator"], optimizer=objects["optimizer"]
            )
            self.store.restore(partial, info, partial=True)
        self._nonfinite_run = 0
        self.metrics.training_diverged.set(1)
