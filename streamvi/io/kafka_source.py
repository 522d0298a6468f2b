"""The Kafka record source: a kafka-python group consumer, auto-commit off, seeking to snapshot offsets."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from kafka import KafkaConsumer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from streamvi.config import KafkaSettings
from streamvi.errors import CommitError
from streamvi.io.base import Partition, RawRecord
from streamvi.io.group import GroupRecordSource

log = logging.getLogger(__name__)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: KafkaRecordSource) -> None:
        self.source = source

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.source._revoked([(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.source._assigned([(tp.topic, tp.partition) for tp in assigned])


class KafkaRecordSource(GroupRecordSource):
    """Consumes ``kafka.input_topic``; offsets are committed only when the loop says so."""

    def __init__(self, settings: KafkaSettings, isolation_level: str = "read_uncommitted") -> None:
        self.settings = settings
        super().__init__()
        self._consumer = KafkaConsumer(
            **settings.client_options(),
            group_id=settings.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            max_poll_records=settings.max_poll_records,
            fetch_max_bytes=settings.fetch_max_bytes,
            max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            isolation_level=isolation_level,
        )
        self._consumer.subscribe([settings.input_topic], listener=_Listener(self))

    # rebalance hooks, called from inside poll() on the loop's thread
    def _assigned(self, partitions: list[Partition]) -> None:
        for partition in partitions:
            offset = self.start_offset(partition, log)
            if offset is not None:
                self._consumer.seek(TopicPartition(*partition), offset)
        self._on_assigned(partitions)

    def _revoked(self, partitions: list[Partition]) -> None:
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

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        if not offsets:
            return
        try:
            self._consumer.commit(to_kafka_offsets(offsets))
        except KafkaError as exc:
            self.commit_failed(offsets)
            raise CommitError(f"committing offsets for group {self.settings.group_id} failed: {exc}") from exc
        self.committed_to_group(offsets)

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

    def keepalive(self) -> None:
        # Every partition is paused, so this poll fetches nothing: it only tells the group that this
        # member is alive (max_poll_interval_ms) and serves any rebalance (callbacks included).
        assigned = self._consumer.assignment()
        already = set(self._consumer.paused())
        self._consumer.pause(*assigned)
        try:
            stray = self._consumer.poll(timeout_ms=0, max_records=1)
        finally:
            self._consumer.resume(*(self._consumer.assignment() - already))
        for tp, messages in stray.items():  # newly assigned partitions are not paused yet
            self._consumer.seek(tp, min(m.offset for m in messages))

    def connected(self) -> bool:
        # Reads two fields the heartbeat thread writes; safe from any thread.
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is None or getattr(coordinator, "coordinator_id", None) is None:
            return False
        heartbeat = coordinator.heartbeat
        answered = max(heartbeat.last_receive, heartbeat.last_reset)
        limit = max(3 * self.settings.heartbeat_interval_ms / 1000.0, 2.0)
        return time.monotonic() - answered < limit

    def assignment(self) -> list[Partition]:
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def highwater(self, partition: Partition) -> int | None:
        value = self._consumer.highwater(TopicPartition(*partition))
        return None if value is None else int(value)

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def to_kafka_offsets(offsets: Mapping[Partition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {TopicPartition(*p): OffsetAndMetadata(offset, "", -1) for p, offset in offsets.items()}
