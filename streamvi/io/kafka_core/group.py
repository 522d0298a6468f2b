"""The consumer-group side of the core: a group source's state and sequences, and broker liveness."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar

from streamvi.config import KafkaSettings
from streamvi.errors import CommitError
from streamvi.io.base import Partition, RecordSource


def _noop(partitions: Sequence[Partition]) -> None:
    return None


class GroupSource(RecordSource):
    """A record source that is a member of ``kafka.group_id``, on either client library.

    Where an assigned partition starts: at a restored snapshot's offset, or (after a commit that
    failed) at the offset the snapshot holds rather than the group's older committed one. The
    loop's rebalance hooks are called by the client from inside ``poll`` (and ``keepalive``) on the
    polling thread; ``_in_rebalance`` says that one of them is running.
    """

    _log: ClassVar[logging.Logger]

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._start_offsets: dict[Partition, int] = {}
        self._uncommitted: dict[Partition, int] = {}  # offsets whose commit failed
        self._on_assigned: Callable[[Sequence[Partition]], None] = _noop
        self._on_revoked: Callable[[Sequence[Partition]], None] = _noop
        self._in_rebalance = False

    # -- what the client library does --------------------------------------------------------------
    @abstractmethod
    def _commit(self, offsets: Mapping[Partition, int]) -> None:
        """Commit ``offsets`` (not empty) for the group; raise :meth:`_commit_error` if that failed."""

    @abstractmethod
    def _paused(self) -> contextlib.AbstractContextManager[None]:
        """Every assigned partition paused inside, resumed (if still assigned) after."""

    @abstractmethod
    def _poll_paused(self) -> list[tuple[Partition, int]]:
        """Poll once without waiting; (partition, offset) of any record it returned anyway."""

    @abstractmethod
    def _seek_one(self, partition: Partition, offset: int) -> None:
        """Fetch ``partition`` from ``offset`` next."""

    # -- the interface ---------------------------------------------------------------------------
    def set_start_offsets(self, offsets: Mapping[Partition, int]) -> None:
        self._start_offsets = dict(offsets)

    def set_rebalance_callbacks(
        self,
        on_assigned: Callable[[Sequence[Partition]], None],
        on_revoked: Callable[[Sequence[Partition]], None],
    ) -> None:
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        if not offsets:
            return
        try:
            self._commit(offsets)
        except CommitError:
            self.commit_failed(offsets)
            raise
        self.committed_to_group(offsets)

    def keepalive(self) -> None:
        # Every partition is paused, so this poll takes no record: it only tells the group that this
        # member is alive (max_poll_interval_ms) and serves any rebalance (callbacks included).
        with self._paused():
            stray = self._poll_paused()
        first: dict[Partition, int] = {}
        for partition, offset in stray:  # from a partition assigned during this call, so not paused
            first[partition] = min(offset, first.get(partition, offset))
        for partition, offset in first.items():
            self._seek_one(partition, offset)

    # -- the group state ---------------------------------------------------------------------------
    def _commit_error(self, detail: object) -> CommitError:
        return CommitError(f"committing offsets for group {self.settings.group_id} failed: {detail}")

    @contextlib.contextmanager
    def _rebalancing(self) -> Iterator[None]:
        self._in_rebalance = True
        try:
            yield
        finally:
            self._in_rebalance = False

    def start_offset(self, partition: Partition) -> int | None:
        """Where a newly assigned ``partition`` resumes (None: at the group's committed offset)."""
        offset = self._start_offsets.get(partition)
        if offset is not None:
            self._log.info("partition %s:%d assigned, resuming at snapshot offset %d", *partition, offset)
        else:
            self._log.info("partition %s:%d assigned, resuming at the group's committed offset", *partition)
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


class Liveness:
    """When the broker last answered (monotonic seconds) and for how long that counts as connected:
    about three heartbeat intervals, at least 2 s, plus how old the evidence may be when it arrives.
    Written by the polling thread, read as one float from any thread."""

    def __init__(self, heartbeat_interval_ms: int, evidence_age_seconds: float = 0.0) -> None:
        self.limit = max(3 * heartbeat_interval_ms / 1000.0, 2.0) + evidence_age_seconds
        self._answered_at = -math.inf

    def answered(self, at: float | None = None) -> None:
        """The broker answered ``at`` (default: now)."""
        at = time.monotonic() if at is None else at
        if at > self._answered_at:
            self._answered_at = at

    def lost(self) -> None:
        """No broker answers: not connected until one does again."""
        self._answered_at = -math.inf

    def fresh(self, answered_at: float) -> bool:
        """Whether an answer at ``answered_at`` is recent enough to count as connected."""
        return time.monotonic() - answered_at < self.limit

    def alive(self) -> bool:
        return self.fresh(self._answered_at)
