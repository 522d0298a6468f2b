"""One committer per delivery guarantee: what a checkpoint does at each step of the commit order.

At-least-once: snapshot durable, then the group's offsets committed; outputs after the snapshot
may be published again after a crash (counted through the output progress file).

Exactly-once, a two-phase scheme: the snapshot is written *pending*, then one transaction makes
the interval's outputs visible and commits its offsets; only then is the snapshot trusted and the
older ones pruned. A snapshot whose offsets are ahead of the group's committed offsets belongs to a
transaction that never committed, and is discarded at start. Trainer workers each commit their own
transaction for the same snapshot; when some commit and others do not, the group goes back to the
snapshot before it, and the committed records are trained again with their outputs withheld
(streamvi/stream/progress.py): only the chief, which writes the shared store, discards and prunes.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import tensorflow as tf

from streamvi.errors import StreamVIError
from streamvi.io.base import OutputSink, Partition, RecordSource
from streamvi.snapshots.store import SnapshotInfo, SnapshotStore
from streamvi.snapshots.trust import offsets_ahead
from streamvi.stream.progress import OutputProgress

log = logging.getLogger(__name__)

#: Checks a snapshot against the config in force before it is trusted (raises if it does not fit).
SnapshotCheck = Callable[[SnapshotInfo], None]


class Committer(ABC):
    """The guarantee-specific steps of a checkpoint, in the order the checkpoint calls them."""

    guarantee: str

    def __init__(
        self, source: RecordSource, sink: OutputSink, store: SnapshotStore, progress: OutputProgress
    ):
        self.source = source
        self.sink = sink
        self.store = store
        self.progress = progress

    @abstractmethod
    def trusted_snapshot(self, check: SnapshotCheck) -> SnapshotInfo | None:
        """The snapshot a start-up restores: the newest that this guarantee trusts."""

    def outputs_flushed(self) -> None:
        """Step 2 done: every output so far is acknowledged by the broker."""
        return None

    @abstractmethod
    def write_snapshot(
        self,
        checkpoint: tf.train.Checkpoint,
        step: int,
        meta: dict[str, object],
        files: Mapping[str, bytes] | None = None,
    ) -> SnapshotInfo:
        """Step 3: the snapshot made durable (with ``files`` beside it, see SnapshotStore.write)."""

    def snapshot_abandoned(self, info: SnapshotInfo) -> None:
        """Partitions were revoked while the snapshot was written: it will not be committed."""
        return None

    def discard(self, info: SnapshotInfo, reason: str) -> None:
        """Take a snapshot whose commit failed out of use (only a guarantee whose commit can fail)."""
        return None

    @abstractmethod
    def commit(self, info: SnapshotInfo, offsets: dict[Partition, int]) -> str | None:
        """Step 4: commit the offsets the snapshot holds; the reason to rewind when that failed."""

    def committed(self) -> None:
        """Step 5: after a successful commit."""
        return None

    def abort(self) -> None:
        """A rewind: give up the interval's outputs where the guarantee allows it."""
        return None

    def fetch_handled(self) -> None:
        """A fetch was processed in full."""
        return None


class AtLeastOnceCommitter(Committer):
    guarantee = "at_least_once"

    def trusted_snapshot(self, check: SnapshotCheck) -> SnapshotInfo | None:
        latest = self.store.latest()
        if latest is not None:
            check(latest)
        return latest

    def outputs_flushed(self) -> None:
        self.progress.persist()

    def write_snapshot(
        self,
        checkpoint: tf.train.Checkpoint,
        step: int,
        meta: dict[str, object],
        files: Mapping[str, bytes] | None = None,
    ) -> SnapshotInfo:
        return self.store.write(checkpoint, step, meta, files=files)

    def commit(self, info: SnapshotInfo, offsets: dict[Partition, int]) -> str | None:
        try:
            self.source.commit(offsets)
        except StreamVIError as exc:
            # The snapshot is durable and a restart resumes at its offsets; the group catches up at
            # the next checkpoint.
            log.warning("committing offsets failed (the snapshot is durable, retrying later): %s", exc)
        return None

    def fetch_handled(self) -> None:
        self.progress.persist()


class ExactlyOnceCommitter(Committer):
    guarantee = "exactly_once"

    def __init__(
        self,
        source: RecordSource,
        sink: OutputSink,
        store: SnapshotStore,
        progress: OutputProgress,
        writes_store: bool = True,
    ):
        """``writes_store=False``: a trainer worker other than the chief, which only reads the
        shared snapshot store (it never discards or prunes)."""
        if not sink.transactional:
            raise ValueError("exactly-once processing needs a transactional sink")
        super().__init__(source, sink, store, progress)
        self.writes_store = writes_store

    def discard(self, info: SnapshotInfo, reason: str) -> None:
        """Take a snapshot whose transaction did not commit out of use (the store's writer only;
        once is enough)."""
        if self.writes_store and info.path.exists():
            self.store.discard(info, reason)

    def trusted_snapshot(self, check: SnapshotCheck) -> SnapshotInfo | None:
        """The newest valid snapshot whose transaction committed.

        A snapshot is written before its transaction commits, and the transaction commits the
        snapshot's offsets for the group; so a snapshot whose offsets are ahead of the group's
        committed offsets belongs to a transaction that never committed, and is discarded.
        """
        valid = list(self.store.valid())
        partitions = sorted({p for info in valid for p in info.offsets})
        committed = self.source.committed_offsets(partitions) if partitions else {}
        for info in valid:
            check(info)
            ahead = offsets_ahead(info, committed)
            if ahead:
                reason = f"its transaction never committed (offsets {ahead}, group {committed})"
                self.discard(info, reason)
                continue
            # Behind the committed offsets on some partitions (trainer workers of which only some
            # committed the newer snapshot, or a newer snapshot lost): the loop resumes at the
            # snapshot's offsets and withholds the outputs that are already visible (Recovery.load).
            return info
        return None

    def write_snapshot(
        self,
        checkpoint: tf.train.Checkpoint,
        step: int,
        meta: dict[str, object],
        files: Mapping[str, bytes] | None = None,
    ) -> SnapshotInfo:
        # pending until its transaction commits: the older snapshots must survive until then
        return self.store.write(checkpoint, step, meta, prune=False, files=files)

    def snapshot_abandoned(self, info: SnapshotInfo) -> None:
        self.discard(info, "partitions revoked before its transaction committed")

    def commit(self, info: SnapshotInfo, offsets: dict[Partition, int]) -> str | None:
        try:
            self.sink.commit_transaction(offsets, self.source.group_metadata())
        except StreamVIError as exc:
            # Not committed: the transaction is aborted and this snapshot must never be used.
            self.discard(info, f"its transaction failed to commit: {exc}")
            return f"the transaction failed to commit: {exc}"
        self.progress.committed_through(offsets)
        return None

    def committed(self) -> None:
        # older snapshots go only now, so a trusted one always survives
        if self.writes_store:
            self.store.prune()

    def abort(self) -> None:
        try:
            self.sink.abort_transaction()
        except StreamVIError as exc:
            log.warning("aborting the transaction failed (it will time out on the broker): %s", exc)


def committer_for(
    exactly_once: bool,
    source: RecordSource,
    sink: OutputSink,
    store: SnapshotStore,
    progress: OutputProgress,
    writes_store: bool = True,
) -> Committer:
    """The committer of the guarantee; ``writes_store=False`` for a trainer worker that only reads
    the chief's snapshot store."""
    if exactly_once:
        return ExactlyOnceCommitter(source, sink, store, progress, writes_store)
    return AtLeastOnceCommitter(source, sink, store, progress)
