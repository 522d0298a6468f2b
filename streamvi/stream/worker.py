"""The trainer-worker role: one of N trainers that learn one model in lockstep.

It is the trainer role (streamvi/stream/online.py) with every decision that must be the same on all
workers taken on an all-reduced round (streamvi/training/lockstep.py): when batches close (one step
of the all-reduced trainer, streamvi/training/distributed.py, with every worker's batch, empty ones
included), when all checkpoint together (streamvi/stream/worker_checkpoint.py), when all stop, and
when all rewind to the last trusted snapshot (after a rebalance moved partitions, or a worker failed
to deliver its outputs), and when all answer a drift one of their detectors found (the response
changes the optimizer). A decision never comes from one worker's state alone, so the workers issue
the same collectives in the same order and none waits on another forever.

Steps run one at a time (the step pipeline's depth is 1 and a step is waited for before the next
round): a round's collective never runs beside a step's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from streamvi.anomaly.monitor import AnomalyMonitor
from streamvi.errors import StreamVIError, WorkerLostError
from streamvi.io.base import Partition
from streamvi.snapshots.store import SnapshotInfo
from streamvi.stream.online import OnlineLoop
from streamvi.stream.state import LoopCounts
from streamvi.training.distributed import DistributedStepResult, DistributedTrainer
from streamvi.training.lockstep import Agreement, Round, agree, all_agree
from streamvi.training.results import StepResult

log = logging.getLogger(__name__)

#: How a collective fails when another worker is gone: its peer is unreachable (the gRPC error),
#: ``distribution.collective_timeout_seconds`` passed, or an earlier failure aborted the collectives.
COLLECTIVE_FAILURES = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
)


class WorkerLoop(OnlineLoop):
    """An :class:`OnlineLoop` whose batches, checkpoints, stops and rewinds are agreed by all workers."""

    def __init__(self, *, topic: str, **kwargs: Any) -> None:
        """``topic``: the input topic, whose partitions the workers share (their offsets are gathered)."""
        self.topic = topic
        trainer = kwargs["trainer"]
        if not isinstance(trainer, DistributedTrainer):
            raise TypeError("a worker loop needs the all-reduced trainer (DistributedTrainer)")
        self.worker: DistributedTrainer = trainer
        #: Why this worker wants every worker to rewind at the next round, and whether that answers
        #: a rebalance (logged as a warning) rather than a failure; None: it does not.
        self._rewind_wanted: tuple[str, bool] | None = None
        super().__init__(**{**kwargs, "pipeline_depth": 1})
        #: This worker is stopping (signal, record budget or idle timeout): it says so at each round.
        self._stopping = False
        #: Idle past the idle timeout (the workers stop when all are).
        self._idle = False
        #: Inside an agreed round: only there does a checkpoint run (see ``run_checkpoint``).
        self._in_round = False
        #: A round agreed to stop: no further round; the loop goes to the final checkpoint.
        self._stop_agreed = False
        #: This worker's detector found a drift that the next round will answer everywhere.
        self._drift_found_here = False

    # -- the parts that differ from the single trainer --------------------------------------------
    def _make_checkpoints(self, **kwargs: Any) -> Any:
        from streamvi.stream.worker_checkpoint import WorkerCheckpoints

        return WorkerCheckpoints(cluster=self.worker, topic=self.topic, rewind_all=self._rewind_now, **kwargs)

    def _make_recovery(self, **kwargs: Any) -> Any:
        from streamvi.stream.worker_checkpoint import WorkerRecovery

        return WorkerRecovery(worker=self.worker, **kwargs)

    def _writes_snapshots(self) -> bool:
        """Only the chief writes the shared snapshot store; the other workers read it."""
        return self.worker.is_chief

    def restore(self) -> SnapshotInfo | None:
        """Every worker restores the newest trusted snapshot of the shared snapshot store (the
        chief's), then takes the chief's state, so all start from the same parameters even before
        the first snapshot exists. The chief chooses first (under exactly-once it discards the
        snapshots whose transactions did not commit); the others choose by the same rule once it
        has, and a different choice is an error."""
        if self.worker.is_chief:
            info = super().restore()
            all_agree(self.worker, True)
        else:
            all_agree(self.worker, True)
            info = super().restore()
        chosen = self.worker.gather_ints([-1 if info is None else info.step])
        if len({values[0] for values in chosen}) != 1:
            raise StreamVIError(
                f"the trainer workers restored different snapshots (steps {[v[0] for v in chosen]}): "
                "they must share snapshots.dir"
            )
        self.worker.sync_from_chief()
        self.recovery.start_from(info)  # the initial state a rewind goes back to: the synced one
        self.pipeline.submitted_step = self.trainer.step
        return info

    def _before_run(self) -> None:
        """Compile the (collective) step before the first round, not beside it: every collective
        of a worker is issued from one place at a time, in the same order as on the others."""
        if not self._warmed_up:
            self._warmed_up = True
            self.pipeline.executor().submit(self._compile_step).result()

    # -- rebalances: never a local checkpoint, always an agreed rewind -----------------------------
    def on_assigned(self, partitions: Sequence[Partition]) -> None:
        super().on_assigned(partitions)
        assigned = set(self.source.assignment()) | set(partitions)
        for partition in list(self.state.next_offsets):
            if partition not in assigned:  # another worker's now: its offsets are not ours to record
                del self.state.next_offsets[partition]

    def on_revoked(self, partitions: Sequence[Partition]) -> None:
        """The records of these partitions trained since the last snapshot cannot be committed any
        more; the next round has every worker rewind to that snapshot (no local checkpoint: it would
        be a collective the others do not join)."""
        if partitions:
            if self._rewind_wanted is None:  # a failure already wanted keeps its reason
                self._rewind_wanted = (f"partitions {sorted(partitions)} revoked by a rebalance", True)
            for partition in partitions:
                self.state.next_offsets.pop(partition, None)
            self.checkpoints.forget(partitions)
        for topic, number in partitions:
            self.metrics.consumer_lag.remove(topic, str(number))
        self.health.set(partitions_assigned=bool(self.source.assignment()))
        self._assigned_at = None  # waiting for the new assignment is not idleness

    def _rewind(self, reason: str, routine: bool = False) -> None:
        """A failure seen by this worker alone: every worker rewinds at the next round."""
        self._rewind_wanted = (reason, routine)

    # -- drifts are answered by every worker at the same round ------------------------------------
    def _drift_found(self, monitor: AnomalyMonitor, step: int) -> None:
        """Not acted on alone: the response changes the optimizer, which must stay equal on every
        worker, so the drift goes to the next round and every worker answers it there."""
        self._drift_found_here = True

    def _agreed_drift(self) -> None:
        """Some worker found a drift: every worker reports it and runs the response, before the
        round's step; those that did not find it adapt as the finder did."""
        assert self.anomaly is not None
        if not self._drift_found_here:
            self.anomaly.follow_drift()
        self._drift_found_here = False
        self._drifted(self.anomaly, self.trainer.step)

    def _step_counts_for_response(self, result: StepResult) -> bool:
        """Every worker counts the steps the union trained (an idle worker's too), so a raised
        learning rate ends at the same step everywhere."""
        return isinstance(result, DistributedStepResult) and result.union_trained_records > 0

    def _rewind_now(self, reason: str, routine: bool = False) -> None:
        """Rewind this worker now: called on every worker at the same agreed point (a drift found
        in the abandoned interval is dropped with it). ``routine``: it answers a rebalance, or
        another worker's rewind (that worker logs its failure), not a failure of this one."""
        self._rewind_wanted = None
        self._drift_found_here = False
        super()._rewind(reason, routine)
        self.pipeline.submitted_step = self.trainer.step

    # -- batches close only on an agreement ---------------------------------------------------------
    def _submit_batch(self) -> None:
        """A full batch (or a due one) goes to the next round rather than straight to the step."""
        if not self._stop_agreed:
            self.lockstep_round()

    def _train_and_drain(self) -> bool:
        """The agreed round before a checkpoint has already stepped every open batch."""
        self._drain()
        return True

    def lockstep_round(self) -> Agreement:
        """One round: bring this worker's state, then do what all agreed, in the same order on
        every worker: rewind, or step (every worker's batch, empty ones too), then checkpoint."""
        batcher = self.pipeline.batcher
        mine = Round(
            rows=len(batcher),
            full=batcher.full,
            due=batcher.due(),
            stopping=self._stopping,
            checkpoint=self.checkpoints.due(),
            rewind=self._rewind_wanted is not None,
            idle=self._idle,
            drift=self._drift_found_here,
        )
        agreement = agree(self.worker, mine)
        if agreement.rewind:
            # another worker's rewind is routine here: that worker logs its own failure
            self._rewind_now(*(self._rewind_wanted or ("another worker rewinds", True)))
            return agreement
        if agreement.drift:
            self._agreed_drift()
        if agreement.close:
            self._step_everywhere()
        if agreement.checkpoint:
            self._agreed_checkpoint("interval")
        if agreement.stop:
            # Every worker stops after this round, wherever it met it (between polls, or inside a
            # fetch whose batch filled): the rest of such a fetch is left unconsumed, its offsets
            # not recorded, so a restart reads it again; the other workers hold no more rounds.
            self._stop_agreed = True
            self.recovery.epoch += 1
        return agreement

    def run_checkpoint(self, reason: str) -> SnapshotInfo | None:
        """Outside a round a checkpoint is not this worker's to start (the trainer's loop asks for
        one after a full batch): its time comes with the next round's agreement."""
        if not self._in_round:
            return None
        return super().run_checkpoint(reason)

    def _agreed_checkpoint(self, reason: str) -> SnapshotInfo | None:
        """The collective checkpoint every worker runs at the same point."""
        self._in_round = True
        try:
            return super().run_checkpoint(reason)
        finally:
            self._in_round = False

    def _step_everywhere(self) -> None:
        """This worker's part of one all-reduced step (possibly 0 records), waited for and published."""
        self._between_batches()
        evaluation = self.evaluation
        self.pipeline.submit(
            evaluation.every_steps if evaluation is not None else None,
            self._heldout_payload,
            lambda: evaluation.reservoir.contents() if evaluation is not None else None,
            self.anomaly.thresholds() if self.anomaly is not None else None,
        )
        self._drain()
        self.pipeline.submitted_step = self.trainer.step

    # -- the loop -----------------------------------------------------------------------------------
    def run(
        self,
        stop: threading.Event | None = None,
        max_records: int | None = None,
        idle_timeout_seconds: float | None = None,
    ) -> LoopCounts:
        """Poll, batch and meet the other workers at a round after every poll, until one of them
        stops (then all take the final step and checkpoint together).

        An idle topic costs one small round per poll timeout (at most 0.2 s, or the open batch's
        latency bound): the workers wait in their polls, not in a spinning loop.
        """
        try:
            return self._run_in_lockstep(stop or threading.Event(), max_records, idle_timeout_seconds)
        except COLLECTIVE_FAILURES as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WorkerLostError(
                f"worker {self.worker.worker_index}: a collective with the other trainer workers failed "
                f"({message}); restart the group: it resumes from the last snapshot"
            ) from exc

    def _run_in_lockstep(
        self, stop: threading.Event, max_records: int | None, idle_timeout_seconds: float | None
    ) -> LoopCounts:
        consumed, last_record_time = 0, time.monotonic()
        self._before_run()
        while True:
            self.health.beat()
            budget = self.max_poll_records if max_records is None else max(0, max_records - consumed)
            records = self.source.poll(self._poll_timeout(), budget) if budget else []
            now = time.monotonic()
            if records:
                last_record_time, consumed = now, consumed + len(records)
                self.handle(records)
            if self._stop_agreed:
                break
            self._idle = (
                idle_timeout_seconds is not None
                and self._idle_for(now, last_record_time) >= idle_timeout_seconds
            )
            if (
                stop.is_set() or (max_records is not None and consumed >= max_records)
            ) and not self._stopping:
                log.info("worker %d stopping; the others stop with it", self.worker.worker_index)
                self._stopping = True
            self.lockstep_round()
            if self._stop_agreed:
                break
            if self._lag_pending or now - self._last_lag_time >= self.lag_interval_seconds:
                self._lag_pending = not self._update_lag()
                self._last_lag_time = now
        self._final_round()
        self._update_lag()
        self.pipeline.shutdown()
        self.recovery.close()
        self._after_run()
        return self.counts

    def _after_run(self) -> None:
        """The parameters' checksum: equal on every worker (an operator can compare the logs)."""
        super()._after_run()
        log.info(
            "worker %d of %d: step %d, parameter checksum %s",
            self.worker.worker_index,
            self.worker.workers,
            self.trainer.step,
            self.worker.checksum(),
        )

    def _final_round(self) -> None:
        """Every worker steps what it still holds and checkpoints, together (the stop round closed
        the batches; this is the shutdown checkpoint every worker runs)."""
        self._agreed_checkpoint("shutdown")
