"""In-memory source and sink with the same contracts as the Kafka ones, for unit tests and offline runs.

tests/contract/checks.py holds them to the properties the Kafka adapters have on a real broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from streamvi.io.base import OutputMessage, OutputSink, Partition, RawRecord, RecordSource


class MemorySource(RecordSource):
    """Serves a fixed list of records, one partition each as given, honouring start offsets and commits."""

    def __init__(self, records: Iterable[RawRecord]) -> None:
        self.records = list(records)
        self.committed: dict[Partition, int] = {}
        self.commits: list[dict[Partition, int]] = []
        self._positions: dict[Partition, int] = {}
        self._start: dict[Partition, int] = {}
        self._assigned = False
        self._on_assigned: Callable[[Sequence[Partition]], None] = lambda partitions: None
        self._on_revoked: Callable[[Sequence[Partition]], None] = lambda partitions: None
        self.closed = False

    def _partitions(self) -> list[Partition]:
        return sorted({(r.topic, r.partition) for r in self.records})

    def poll(self, timeout_seconds: float, max_records: int) -> list[RawRecord]:
        if not self._assigned:
            self._assigned = True
            for partition in self._partitions():
                self._positions[partition] = self._start.get(partition, self.committed.get(partition, 0))
            self._on_assigned(self._partitions())
        out: list[RawRecord] = []
        for record in self.records:
            partition = (record.topic, record.partition)
            if len(out) >= max_records:
                break
            if record.offset == self._positions.get(partition, 0):
                out.append(record)
                self._positions[partition] = record.offset + 1
        return out

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        self.committed.update(offsets)
        self.commits.append(dict(offsets))

    def set_start_offsets(self, offsets: Mapping[Partition, int]) -> None:
        self._start = dict(offsets)

    def set_rebalance_callbacks(
        self,
        on_assigned: Callable[[Sequence[Partition]], None],
        on_revoked: Callable[[Sequence[Partition]], None],
    ) -> None:
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked

    def assignment(self) -> list[Partition]:
        return self._partitions() if self._assigned else []

    def highwater(self, partition: Partition) -> int | None:
        offsets = [r.offset for r in self.records if (r.topic, r.partition) == partition]
        return max(offsets) + 1 if offsets else 0

    def position(self, partition: Partition) -> int | None:
        return self._positions.get(partition) if self._assigned else None

    def close(self) -> None:
        self.closed = True

    def committed_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        return {p: self.committed[p] for p in partitions if p in self.committed}

    def group_metadata(self) -> object:
        return self  # a MemorySink in transactional mode commits offsets through it

    def seek(self, offsets: Mapping[Partition, int]) -> None:
        self._start = dict(offsets)
        if self._assigned:
            for partition in self._partitions():
                self._positions[partition] = offsets.get(partition, self.committed.get(partition, 0))


class MemorySink(OutputSink):
    """Collects messages; ``flush`` moves them from pending to delivered, as a broker ack would.

    With ``transactional=True`` flushed messages wait in ``in_transaction`` until
    ``commit_transaction`` delivers them and commits the offsets on the MemorySource given as the
    group metadata, in one step; ``abort_transaction`` drops them.
    """

    def __init__(self, transactional: bool = False) -> None:
        self.transactional = transactional
        self.pending: list[OutputMessage] = []
        self.in_transaction: list[OutputMessage] = []
        self.delivered: list[OutputMessage] = []
        self.flushes = 0
        self.transactions = 0
        self.aborts = 0

    def send(self, message: OutputMessage) -> None:
        self.pending.append(message)

    def flush(self, timeout_seconds: float | None = None) -> None:
        (self.in_transaction if self.transactional else self.delivered).extend(self.pending)
        self.pending.clear()
        self.flushes += 1

    def commit_transaction(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        if not self.transactional:
            super().commit_transaction(offsets, group_metadata)
        self.flush()
        if isinstance(group_metadata, MemorySource):
            group_metadata.commit(offsets)
        self.delivered.extend(self.in_transaction)
        self.in_transaction.clear()
        self.transactions += 1

    def abort_transaction(self) -> None:
        if self.transactional:  # without transactions there is nothing to drop
            self.pending.clear()
            self.in_transaction.clear()
        self.aborts += 1

    def close(self) -> None:
        self.flush()

    def on_topic(self, topic: str) -> list[OutputMessage]:
        return [m for m in self.delivered if m.topic == topic]
