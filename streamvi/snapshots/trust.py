"""Which snapshots may be used: under exactly-once, only those whose transaction committed.

The trainer writes an exactly-once snapshot before the transaction that commits its outputs and
offsets; so a snapshot whose offsets are ahead of the trainer group's committed offsets belongs to
a transaction that has not (or never) committed. The trainer's start-up and the encoder replicas
judge by the same rule, against the same committed offsets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

from streamvi.io.base import Partition
from streamvi.snapshots.base import SnapshotInfo

#: The trainer group's committed next offset of each partition asked about that has one.
CommittedOffsets = Callable[[Sequence[Partition]], Mapping[Partition, int]]


def offsets_ahead(info: SnapshotInfo, committed: Mapping[Partition, int]) -> dict[Partition, int]:
    """The snapshot's offsets that are ahead of ``committed``: non-empty when its transaction has
    not committed."""
    return {p: o for p, o in info.offsets.items() if o > committed.get(p, 0)}


class SnapshotTrust(ABC):
    """Decides, for snapshots that verify, which are trusted (may be loaded)."""

    @abstractmethod
    def trusted(self, snapshots: Sequence[SnapshotInfo]) -> list[bool]:
        """For each snapshot, whether it is trusted now."""


class DurableTrust(SnapshotTrust):
    """At-least-once: a snapshot is trusted once it is durable (written and renamed into place)."""

    def trusted(self, snapshots: Sequence[SnapshotInfo]) -> list[bool]:
        return [True] * len(snapshots)


class CommittedTrust(SnapshotTrust):
    """Exactly-once: a snapshot is trusted once the trainer's transaction committed its offsets."""

    def __init__(self, committed_offsets: CommittedOffsets) -> None:
        self._committed_offsets = committed_offsets

    def trusted(self, snapshots: Sequence[SnapshotInfo]) -> list[bool]:
        partitions = sorted({p for info in snapshots for p in info.offsets})
        committed = self._committed_offsets(partitions) if partitions else {}
        return [not offsets_ahead(info, committed) for info in snapshots]
