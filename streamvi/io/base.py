"""Interfaces between the online loop and the outside world: where records come from, where outputs go.

The loop only sees these types, so it runs unchanged on Kafka or on in-memory test doubles.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from streamvi.errors import StreamVIError

#: A partition of a topic, as (topic, partition).
Partition = tuple[str, int]
Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One input record as fetched: undecoded bytes and where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)
    timestamp_ms: int = -1


@dataclass(frozen=True, slots=True)
class OutputMessage:
    """One message to publish: topic, key, value bytes and headers."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers = field(default_factory=list)


class RecordSource(ABC):
    """A partitioned, replayable stream of input records with committable positions."""

    @abstractmethod
    def poll(self, timeout_seconds: float, max_records: int) -> list[RawRecord]:
        """Fetch up to ``max_records`` records, waiting at most ``timeout_seconds``."""

    @abstractmethod
    def commit(self, offsets: Mapping[Partition, int]) -> None:
        """Durably record ``offsets`` (the next offset to read per partition) for this consumer group."""

    @abstractmethod
    def set_start_offsets(self, offsets: Mapping[Partition, int]) -> None:
        """Where to resume each partition once it is assigned (from a restored snapshot)."""

    @abstractmethod
    def set_rebalance_callbacks(
        self,
        on_assigned: Callable[[Sequence[Partition]], None],
        on_revoked: Callable[[Sequence[Partition]], None],
    ) -> None:
        """Register hooks called (on the polling thread) when partitions are assigned or revoked.

        Rebalances are eager: every partition is revoked, then the new assignment made. A hook may
        be called with no partition (kafka-python revokes nothing before its first join)."""

    @abstractmethod
    def assignment(self) -> list[Partition]:
        """Partitions currently assigned to this consumer."""

    @abstractmethod
    def highwater(self, partition: Partition) -> int | None:
        """The last known high-water mark (next offset to be written) of ``partition``, if known."""

    @abstractmethod
    def close(self) -> None:
        """Leave the group and release connections."""

    # -- optional capabilities (fault handling); the defaults suit a source that never fails --------
    def position(self, partition: Partition) -> int | None:
        """The next offset the consumer will fetch from ``partition``, if known without waiting on
        the broker (lag of a partition the loop has no record from yet); None when not known."""
        return None

    def committed_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        """The group's committed next offset of each of ``partitions`` that has one."""
        return {}

    def group_metadata(self) -> object:
        """An opaque token of this consumer's group membership, for transactional offset commits."""
        return None

    def seek(self, offsets: Mapping[Partition, int]) -> None:
        """Rewind: every assigned partition goes back to ``offsets`` if listed there, otherwise to the
        group's committed offset (or the start of the partition)."""
        self.set_start_offsets(offsets)

    def keepalive(self) -> None:  # noqa: B027 -- optional; nothing to keep alive by default
        """Poll without taking records (partitions paused), so a long step does not cost the group."""

    def connected(self) -> bool:
        """Whether the broker has answered recently; safe to call from another thread."""
        return True


class OutputSink(ABC):
    """Publishes output messages; ``flush`` returns only when everything sent so far is durable."""

    @abstractmethod
    def send(self, message: OutputMessage) -> None:
        """Queue one message for delivery."""

    def send_many(self, messages: Sequence[OutputMessage]) -> None:
        """Queue several messages."""
        for message in messages:
            self.send(message)

    @abstractmethod
    def flush(self, timeout_seconds: float | None = None) -> None:
        """Block until every queued message is acknowledged; raise OutputError if any failed."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the connection."""

    # -- transactions (exactly-once); a non-transactional sink has none ----------------------------
    #: True when outputs become visible to read_committed consumers only at ``commit_transaction``.
    transactional: bool = False

    def commit_transaction(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        """Atomically make every output since the last commit visible and commit ``offsets`` for the
        consumer group identified by ``group_metadata``; a new transaction starts with the next send."""
        raise StreamVIError(
            f"{type(self).__name__} is not transactional; processing.guarantee=exactly_once needs one"
        )

    def abort_transaction(self) -> None:  # noqa: B027 -- nothing to drop when not transactional
        """Drop every output since the last commit (they never become visible to read_committed)."""
