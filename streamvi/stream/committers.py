"""One committer per delivery guarantee: what a checkpoint does at each step of the commit order.

At-least-once: snapshot durable, then the group's offsets committed; outputs after the snapshot
may be published again after a crash (counted through the output progress file).

Exactly-once, a two-phase scheme: the snapshot is written *pending*, then one transaction makes
the interval's outputs visible and commits its offsets; only then is the snapshot trusted and the
older ones pruned. A snapshot whose offsets are ahead of the group's committed offsets belongs to a
transaction that never committed, and is discarded at start.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import tensorflow as tf

from streamvi.errors import StreamVIError
from streamvi.io.base import OutputSink, Partition, RecordSource
from streamvi.snapshots.store import SnapshotInfo, SnapshotStore, encode_offsets
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
        self, source: RecordSource, sink: OutputSink, store: SnapshotStore, progress: OutputProgress
    ):
        if not sink.transactional:
            raise ValueError("exactly-once processing needs a transactional sink")
        super().__init__(source, sink, store, progress)

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
        self.store.discard(info, "partitions revoked before its transaction committed")

    def commit(self, info: SnapshotInfo, offsets: dict[Partition, int]) -> str | None:
        try:
            self.sink.commit_transaction(offsets, self.source.group_metadata())
        except StreamVIError as exc:
            # Not committed: the transaction is aborted and this snapshot must never be used.
            self.store.discard(info, f"its transaction failed to commit: {exc}")
            return f"the transaction failed to commit: {exc}"
        return None

    def committed(self) -> None:
        # older snapshots go only now, so a trusted one always survives
        self.store.prune()

    def abort(self) -> None:
        try:
            self.sink.abort_transaction()
        except StreamVIError as exc:
            log.warning("aborting the transaction failed (it will time out on the broker): %s", exc)


def committer_for(
    exactly_once: bool, source: RecordSource, sink: OutputSink, store: SnapshotStore, progress: OutputProgress
) -> Committer:
    cls: type[Committer] = ExactlyOnceCommitter if exactly_once else AtLeastOnceCommitter
    return cls(source, sink, store, progress)
