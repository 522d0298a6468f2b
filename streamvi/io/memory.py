"""In-memory source and sink with the same contracts as the Kafka ones, for unit tests and offline runs."""

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

    def close(self) -> None:
        self.closed = True


class MemorySink(OutputSink):
    """Collects messages; ``flush`` moves them from pending to delivered, as a broker ack would."""

    def __init__(self) -> None:
        self.pending: list[OutputMessage] = []
        self.delivered: list[OutputMessage] = []
        self.flushes = 0

    def send(self, message: OutputMessage) -> None:
        self.pending.append(message)

    def flush(self, timeout_seconds: float | None = None) -> None:
        self.delivered.extend(self.pending)
        self.pending.clear()
        self.flushes += 1

    def close(self) -> None:
        self.flush()

    def on_topic(self, topic: str) -> list[OutputMessage]:
        return [m for m in self.delivered if m.topic == topic]
