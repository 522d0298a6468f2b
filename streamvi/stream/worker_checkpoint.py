"""Collective checkpoints and rewinds of N trainer workers (streamvi/stream/worker.py).

Commit order of a worker checkpoint, run by every worker at the same agreed round, after the same
step; each stage goes on only if it succeeded on every worker (:func:`all_agree`), so all take the
same branch:

    1. the agreed round already stepped every open batch (nothing consumed is left pending);
    2. outputs flushed    -- on every worker; a worker whose outputs were not delivered has all of
                             them rewind to the last trusted snapshot;
    3. snapshot durable   -- every worker's next offsets (and record counts) are gathered, and the
                             chief writes one snapshot holding the model, optimizer, step, RNG and
                             all of them to the shared snapshot store;
    4. offsets committed  -- each worker commits its own partitions' offsets, only now; under
                             exactly-once in its own transaction, which also makes its outputs
                             since the last checkpoint visible. Only when every worker committed is
                             the snapshot trusted (and older ones pruned).

A crash anywhere loses nothing and trains nothing twice: a restarted group restores the newest
trusted snapshot on every worker and resumes each partition at *its* offsets. At-least-once, the
group's committed offsets are never ahead of it. Exactly-once, the workers that committed a
snapshot the others did not are ahead of the snapshot before it, which the group goes back to: their
records since are trained again, and their outputs, already visible, withheld (Recovery.load).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any

from streamvi.errors import StreamVIError
from streamvi.snapshots.store import SnapshotInfo
from streamvi.stream.checkpoint import Checkpoints
from streamvi.stream.recovery import Recovery
from streamvi.stream.state import LoopCounts, StreamState
from streamvi.training.distributed import DistributedTrainer
from streamvi.training.lockstep import all_agree, gather_offsets

log = logging.getLogger(__name__)

#: The counts each worker keeps for its own records; the snapshot's ``counts`` sum them. The others
#: (steps, snapshots, skipped updates) advance alike on every worker and are the chief's.
_PER_WORKER = ("records_consumed", "records_trained", "dead_letters", "latents_published", "records_skipped")


class WorkerCheckpoints(Checkpoints):
    """A trainer checkpoint taken by every worker together (the order is this module's)."""

    def __init__(
        self, *, cluster: DistributedTrainer, topic: str, rewind_all: Callable[[str], None], **parts: Any
    ) -> None:
        super().__init__(**parts)
        self.cluster = cluster
        self.topic = topic
        self._rewind_all = rewind_all

    def run(self, reason: str) -> SnapshotInfo | None:
        if all_agree(self.cluster, not self.has_progress()):  # no worker made progress
            self.interval.started_at = time.monotonic()
            return None
        started = time.perf_counter()
        self._drain()
        # 2. outputs flushed, everywhere
        failure = None
        try:
            self.sink.flush()
        except StreamVIError as exc:
            failure = f"outputs were not delivered: {exc}"
        if not all_agree(self.cluster, failure is None):
            self._rewind_all(failure or "another worker's outputs were not delivered")
            return None
        self.committer.outputs_flushed()
        # 3. snapshot durable: the chief writes every worker's offsets with the model
        state = self._state()
        offsets = dict(state.loop.next_offsets)
        state.counts.snapshots += 1
        merged = gather_offsets(self.cluster, self.topic, offsets)
        meta = self._meta(state, merged)
        meta.update(self._group_counts(state.counts))
        step = self.trainer.step
        info = self._write_on_chief(step, meta)
        # 4. offsets committed: each worker its own partitions (exactly-once: in its own
        #    transaction, with its outputs). When any failed, the snapshot is not trusted and all
        #    rewind to the one before; the records of the workers that did commit are then trained
        #    again with their outputs withheld (their committed offsets are past the rewind's).
        commit_failure = self.committer.commit(info, offsets)
        if not all_agree(self.cluster, commit_failure is None):
            reason = commit_failure or "another worker's transaction failed to commit"
            self.committer.discard(info, f"not every worker committed it: {reason}")
            self._rewind_all(reason)
            return None
        self.committer.committed()
        self._trusted(info)
        self.restart(offsets)
        self.metrics.snapshots.inc()
        self.metrics.snapshot_duration.observe(time.perf_counter() - started)
        self.metrics.last_snapshot.set(time.time())
        self.metrics.commits.inc()
        log.info(
            "checkpoint (%s): step %d, snapshot %s of %d workers",
            reason,
            step,
            info.path.name,
            self.cluster.workers,
        )
        return info

    def _group_counts(self, counts: LoopCounts) -> dict[str, Any]:
        """The snapshot's ``counts`` (the group's totals) and each worker's own, in worker order."""
        names = [f.name for f in fields(LoopCounts)]
        gathered = self.cluster.gather_ints([getattr(counts, name) for name in names])
        per_worker = [dict(zip(names, values, strict=True)) for values in gathered]
        totals = dict(asdict(counts))
        for name in _PER_WORKER:
            totals[name] = sum(worker[name] for worker in per_worker)
        return {"counts": totals, "worker_counts": per_worker}

    def _write_on_chief(self, step: int, meta: dict[str, Any]) -> SnapshotInfo:
        """The chief writes the snapshot; the others wait until it is durable, then read it from
        the shared store. A failed write stops every worker (as it stops the single trainer)."""
        info: SnapshotInfo | None = None
        error: BaseException | None = None
        if self.cluster.is_chief:
            files = self._snapshot_files()
            try:
                info = self.pipeline.run_guarded(
                    lambda: self.committer.write_snapshot(self.checkpoint, step, meta, files)
                )
            except Exception as exc:  # re-raised below, once the others know
                error = exc
        if not all_agree(self.cluster, error is None):
            if error is not None:
                raise error
            raise StreamVIError(f"the chief failed to write the snapshot of step {step}")
        if info is None:
            info = self._written_by_chief(step)
        return info

    def _written_by_chief(self, step: int) -> SnapshotInfo:
        latest = self.committer.store.latest()
        if latest is None or latest.step != step:
            found = "none" if latest is None else f"step {latest.step}"
            raise StreamVIError(
                f"the chief's snapshot of step {step} is not in {self.committer.store.directory} "
                f"(newest: {found}): the trainer workers must share snapshots.dir"
            )
        return latest


class WorkerRecovery(Recovery):
    """Loads a group snapshot into one worker: its own counts, and only the offsets of the
    partitions it holds (the others' are resumed by the workers that hold them)."""

    committed_may_pass_trusted = True

    def __init__(self, *, worker: DistributedTrainer, **parts: Any) -> None:
        super().__init__(**parts)
        self.worker = worker

    def load(self, info: SnapshotInfo, at_start: bool = True) -> StreamState:
        state = super().load(info, at_start)
        per_worker = info.meta.get("worker_counts")
        if isinstance(per_worker, list) and self.worker.worker_index < len(per_worker):
            state.counts = LoopCounts.from_meta({"counts": per_worker[self.worker.worker_index]})
        held = set(self.source.assignment())
        state.loop.next_offsets = {p: o for p, o in state.loop.next_offsets.items() if p in held}
        return state
