"""The in-memory source and sink held to the contract of every RecordSource and OutputSink
(tests/contract/checks.py); tests/integration/test_io_contract.py holds the Kafka adapters to it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from streamvi.io.base import OutputMessage, OutputSink, Partition, RawRecord, RecordSource
from streamvi.io.memory import MemorySink, MemorySource
from tests.contract.checks import SINK_CHECKS, SOURCE_CHECKS, Seen, check_id


class MemorySourceWorld:
    """Records in memory; the group's committed offsets are one dict every member shares."""

    topic = "in"
    partitions = 2
    can_rebalance = False

    def __init__(self) -> None:
        self.records: list[RawRecord] = []
        self.group_committed: dict[Partition, int] = {}

    def produce(self, per_partition: int) -> dict[Partition, list[RawRecord]]:
        written: dict[Partition, list[RawRecord]] = {}
        for number in range(self.partitions):
            written[(self.topic, number)] = [
                RawRecord(
                    self.topic,
                    number,
                    offset,
                    None if offset % 3 == 0 else b"k%d-%d" % (number, offset),
                    b"v%d" % offset,
                    [("n", b"%d" % offset)] if offset % 2 else [],
                )
                for offset in range(per_partition)
            ]
        self.records = [r for records in written.values() for r in records]
        return written

    def source(self) -> RecordSource:
        source = MemorySource(self.records)
        source.committed = self.group_committed
        return source


class MemorySinkWorld:
    """Sinks in memory; what they delivered is what a read_committed consumer sees."""

    topic = "out"
    partition = ("in", 0)

    def __init__(self) -> None:
        self.sinks: list[MemorySink] = []
        self.group = MemorySource([])

    def sink(self, transactional: bool) -> OutputSink:
        sink = MemorySink(transactional=transactional)
        self.sinks.append(sink)
        return sink

    def group_metadata(self) -> object:
        return self.group.group_metadata()

    def visible(self, expected: int) -> list[Seen]:
        return [(m.key, m.value, list(m.headers)) for s in self.sinks for m in s.on_topic(self.topic)]

    def committed(self) -> dict[Partition, int]:
        return self.group.committed_offsets(sorted(self.group.committed))

    def undeliverable(self) -> OutputMessage | None:
        return None


@pytest.mark.parametrize("check", SOURCE_CHECKS, ids=check_id)
def test_memory_source(check: Callable[[MemorySourceWorld], None]) -> None:
    check(MemorySourceWorld())


@pytest.mark.parametrize("check", SINK_CHECKS, ids=check_id)
def test_memory_sink(check: Callable[[MemorySinkWorld], None]) -> None:
    check(MemorySinkWorld())
