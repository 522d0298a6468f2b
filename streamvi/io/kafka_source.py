"""The kafka-python record source: a group consumer, auto-commit off, seeking to snapshot offsets.
The group state, commit bookkeeping and keep-alive are :mod:`streamvi.io.kafka_core`'s."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence

from kafka import KafkaConsumer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from streamvi.config import KafkaSettings
from streamvi.io.base import Partition, RawRecord
from streamvi.io.kafka_core import GroupSource, Liveness
from streamvi.io.kafka_options import consumer_options

log = logging.getLogger(__name__)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: KafkaRecordSource) -> None:
        self.source = source

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.source._revoked([(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.source._assigned([(tp.topic, tp.partition) for tp in assigned])


class KafkaRecordSource(GroupSource):
    """Consumes ``kafka.input_topic``; offsets are committed only when the loop says so."""

    _log = log

    def __init__(self, settings: KafkaSettings, isolation_level: str = "read_uncommitted") -> None:
        super().__init__(settings)
        self._liveness = Liveness(settings.heartbeat_interval_ms)
        self._consumer = KafkaConsumer(**consumer_options(settings, isolation_level))
        self._consumer.subscribe([settings.input_topic], listener=_Listener(self))

    # rebalance hooks, called from inside poll() on the loop's thread
    def _assigned(self, partitions: list[Partition]) -> None:
        for partition in partitions:
            offset = self.start_offset(partition)
            if offset is not None:
                self._consumer.seek(TopicPartition(*partition), offset)
        with self._rebalancing():
            self._on_assigned(partitions)

    def _revoked(self, partitions: list[Partition]) -> None:
        with self._rebalancing():
            self._on_revoked(partitions)
        self.forget_revoked(partitions)

    def poll(self, timeout_seconds: float, max_records: int) -> list[RawRecord]:
        batches = self._consumer.poll(timeout_ms=int(timeout_seconds * 1000), max_records=max_records)
        records: list[RawRecord] = []
        for tp, messages in batches.items():
            topic, partition = tp.topic, tp.partition
            records.extend(
                RawRecord(
                    topic,
                    partition,
                    message.offset,
                    message.key,
                    message.value,
                    list(message.headers or ()),
                    message.timestamp,
                )
                for message in messages
            )
        return records

    def _commit(self, offsets: Mapping[Partition, int]) -> None:
        try:
            self._consumer.commit(to_kafka_offsets(offsets))
        except KafkaError as exc:
            raise self._commit_error(exc) from exc

    def committed_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        found: dict[Partition, int] = {}
        for partition in partitions:
            offset = self._consumer.committed(TopicPartition(*partition))
            if offset is not None and offset >= 0:
                found[partition] = int(offset)
        return found

    def group_metadata(self) -> object:
        return self._consumer.group_metadata()

    def seek(self, offsets: Mapping[Partition, int]) -> None:
        self.rewind_to(offsets)
        assigned = self._consumer.assignment()
        unlisted = [tp for tp in assigned if (tp.topic, tp.partition) not in offsets]
        committed = self.committed_offsets([(tp.topic, tp.partition) for tp in unlisted])
        for tp in assigned:
            partition = (tp.topic, tp.partition)
            offset = offsets.get(partition, committed.get(partition))
            if offset is not None:
                self._consumer.seek(tp, offset)
            else:
                self._consumer.seek_to_beginning(tp)

    # keep-alive: pause, poll, resume what this call paused
    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        already = set(self._consumer.paused())
        self._consumer.pause(*self._consumer.assignment())
        try:
            yield
        finally:
            self._consumer.resume(*(self._consumer.assignment() - already))

    def _poll_paused(self) -> list[tuple[Partition, int]]:
        stray = self._consumer.poll(timeout_ms=0, max_records=1)
        return [((tp.topic, tp.partition), m.offset) for tp, messages in stray.items() for m in messages]

    def _seek_one(self, partition: Partition, offset: int) -> None:
        self._consumer.seek(TopicPartition(*partition), offset)

    def connected(self) -> bool:
        # Reads two fields the heartbeat thread writes; safe from any thread.
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is None or getattr(coordinator, "coordinator_id", None) is None:
            return False
        heartbeat = coordinator.heartbeat
        return self._liveness.fresh(max(heartbeat.last_receive, heartbeat.last_reset))

    def assignment(self) -> list[Partition]:
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def highwater(self, partition: Partition) -> int | None:
        value = self._consumer.highwater(TopicPartition(*partition))
        return None if value is None else int(value)

    def position(self, partition: Partition) -> int | None:
        tp = TopicPartition(*partition)
        if self._consumer.highwater(tp) is None:
            return None  # no fetch answered yet: the position may still need the broker
        try:
            value = self._consumer.position(tp, timeout_ms=0)
        except KafkaError:
            return None
        return None if value is None else int(value)

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def to_kafka_offsets(offsets: Mapping[Partition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {TopicPartition(*p): OffsetAndMetadata(offset, "", -1) for p, offset in offsets.items()}
