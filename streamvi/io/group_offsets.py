"""Another consumer group's committed offsets, read without joining it.

An encoder replica under exactly-once trusts a snapshot only once the trainer's transaction has
committed its offsets for the trainer's group (``kafka.group_id``): this reads them, on the
client library ``kafka.client`` names, with the same connection and security settings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from confluent_kafka import Consumer, KafkaException
from confluent_kafka import TopicPartition as RdTopicPartition
from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from streamvi.config import KafkaSettings
from streamvi.errors import StreamVIError
from streamvi.io.base import Partition
from streamvi.io.kafka_options import consumer_options
from streamvi.io.rdkafka_options import rdkafka_config

log = logging.getLogger(__name__)


class GroupOffsets:
    """Committed next offsets of ``settings.group_id``; never subscribes, so never joins the group."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._rdkafka: Consumer | None = None
        self._kafka: KafkaConsumer | None = None
        if settings.client == "librdkafka":
            self._rdkafka = Consumer(rdkafka_config(settings, "consumer", "read_committed"))
        else:
            self._kafka = KafkaConsumer(**consumer_options(settings, "read_committed"))

    def committed(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        """The group's committed next offset of each partition that has one; raises StreamVIError
        when the broker cannot tell (the caller keeps what it has)."""
        if not partitions:
            return {}
        try:
            if self._rdkafka is not None:
                found = self._rdkafka.committed(
                    [RdTopicPartition(topic, number) for topic, number in partitions],
                    timeout=self.settings.request_timeout_ms / 1000,
                )
                return {
                    (tp.topic, tp.partition): int(tp.offset)
                    for tp in found
                    if tp.error is None and tp.offset >= 0
                }
            assert self._kafka is not None
            offsets: dict[Partition, int] = {}
            for topic, number in partitions:
                offset = self._kafka.committed(TopicPartition(topic, number))
                if offset is not None and offset >= 0:
                    offsets[(topic, number)] = int(offset)
            return offsets
        except (KafkaError, KafkaException) as exc:
            raise StreamVIError(
                f"reading the committed offsets of group {self.settings.group_id} failed: {exc}"
            ) from exc

    def close(self) -> None:
        if self._rdkafka is not None:
            self._rdkafka.close()
        if self._kafka is not None:
            self._kafka.close(autocommit=False)
