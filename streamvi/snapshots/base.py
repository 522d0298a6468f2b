"""The snapshot store's read side, as the roles that only load snapshots see it (encoder replicas).

:class:`streamvi.snapshots.store.SnapshotStore` implements it on a local or shared filesystem
directory; another backend (an object store) implements these three methods and the replicas
run on it unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_PREFIX = "state"


@dataclass(frozen=True)
class SnapshotInfo:
    """A verified snapshot and its metadata."""

    path: Path
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        """The snapshot's id: its directory name, ordered by step, then write time."""
        return self.path.name

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def written_at(self) -> float:
        """Unix time the snapshot was written."""
        return float(self.meta.get("created_at", 0.0))

    @property
    def checkpoint_prefix(self) -> str:
        return str(self.path / CHECKPOINT_DIR / CHECKPOINT_PREFIX)

    @property
    def offsets(self) -> dict[tuple[str, int], int]:
        """Next offset to read per (topic, partition), as recorded at snapshot time."""
        return {
            (topic, int(partition)): int(offset)
            for topic, partitions in self.meta.get("offsets", {}).items()
            for partition, offset in partitions.items()
        }


class SnapshotReader(ABC):
    """Lists, verifies and loads snapshots; never writes."""

    @abstractmethod
    def candidates(self) -> Sequence[Path]:
        """Every snapshot present, newest first (by step, then write time), valid or not."""

    @abstractmethod
    def verify(self, path: Path) -> SnapshotInfo:
        """Read one snapshot and check every file against its checksum; raise
        CorruptSnapshotError naming what is wrong."""

    @abstractmethod
    def restore(self, checkpoint: tf.train.Checkpoint, info: SnapshotInfo, *, partial: bool = False) -> None:
        """Load ``info`` into ``checkpoint``; every saved value must match (unless ``partial``)."""
