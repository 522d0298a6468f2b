"""What both Kafka record sources keep about their consumer group, whichever client library reads.

Where an assigned partition starts: at a restored snapshot's offset, or (after a commit that
failed) at the offset the snapshot holds rather than the group's older committed one; and the
loop's rebalance hooks, which the client calls from inside ``poll`` on the polling thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from streamvi.io.base import Partition, RecordSource


def _noop(partitions: Sequence[Partition]) -> None:
    return None


class GroupRecordSource(RecordSource):
    """Start offsets and rebalance hooks of a consumer-group source (see the module docstring)."""

    def __init__(self) -> None:
        self._start_offsets: dict[Partition, int] = {}
        self._uncommitted: dict[Partition, int] = {}  # offsets whose commit failed
        self._on_assigned: Callable[[Sequence[Partition]], None] = _noop
        self._on_revoked: Callable[[Sequence[Partition]], None] = _noop

    def set_start_offsets(self, offsets: Mapping[Partition, int]) -> None:
        self._start_offsets = dict(offsets)

    def set_rebalance_callbacks(
        self,
        on_assigned: Callable[[Sequence[Partition]], None],
        on_revoked: Callable[[Sequence[Partition]], None],
    ) -> None:
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked

    def start_offset(self, partition: Partition, logger: logging.Logger) -> int | None:
        """Where a newly assigned ``partition`` resumes (None: at the group's committed offset);
        says so on the client's own ``logger``."""
        offset = self._start_offsets.get(partition)
        if offset is not None:
            logger.info("partition %s:%d assigned, resuming at snapshot offset %d", *partition, offset)
        else:
            logger.info("partition %s:%d assigned, resuming at the group's committed offset", *partition)
        return offset

    def forget_revoked(self, partitions: Sequence[Partition]) -> None:
        """After the loop's revocation hook: drop their start offsets, except where the revocation's
        commit failed (e.g. the session expired while the broker was away): should this consumer get
        such a partition back, it resumes after what its snapshot holds instead of training again
        on the records since the group's offset."""
        for partition in partitions:
            self._start_offsets.pop(partition, None)
            if partition in self._uncommitted:
                self._start_offsets[partition] = self._uncommitted[partition]

    def commit_failed(self, offsets: Mapping[Partition, int]) -> None:
        """Remember offsets whose commit failed (their snapshot is durable all the same)."""
        self._uncommitted.update(offsets)

    def committed_to_group(self, offsets: Mapping[Partition, int]) -> None:
        """Called once ``offsets`` are committed (directly or by a transaction)."""
        # Later rebalances resume from the committed position; snapshot offsets are now redundant.
        for partition, offset in offsets.items():
            self._uncommitted.pop(partition, None)
            if self._start_offsets.get(partition) == offset:
                del self._start_offsets[partition]

    def rewind_to(self, offsets: Mapping[Partition, int]) -> None:
        """Record the offsets a rewind goes back to, for partitions assigned from now on."""
        self._start_offsets.update(offsets)
