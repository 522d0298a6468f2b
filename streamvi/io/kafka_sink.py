"""The kafka-python output sinks: one idempotence-safe producer for latents, metrics and dead letters,
and its transactional variant for exactly-once processing. Flush, close, the failure latch and the
transaction lifecycle are :mod:`streamvi.io.kafka_core`'s; this module speaks kafka-python."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from streamvi.io.base import OutputMessage, Partition
from streamvi.io.kafka_core import KafkaSink, TransactionalSink
from streamvi.io.kafka_options import producer_options, transactional_producer_options
from streamvi.io.kafka_source import to_kafka_offsets

log = logging.getLogger(__name__)


class KafkaOutputSink(KafkaSink):
    """Sends asynchronously in batches; ``flush`` waits for acks and raises if any send failed."""

    _log = log
    _client_error = KafkaError

    def _create_producer(self) -> KafkaProducer:
        return KafkaProducer(**producer_options(self._settings))

    def send(self, message: OutputMessage) -> None:
        self._ready()
        future = self._producer.send(
            message.topic, value=message.value, key=message.key, headers=message.headers or None
        )
        future.add_errback(self._latch.failed)

    def _flush(self, timeout_seconds: float | None) -> int:
        self._producer.flush(timeout=timeout_seconds)  # raises KafkaTimeoutError when time runs out
        return 0

    def _discard(self, producer: Any) -> None:
        with contextlib.suppress(Exception):
            producer.close(timeout=0)


class KafkaTransactionalSink(TransactionalSink, KafkaOutputSink):
    """kafka-python's transactional producer (see :class:`~streamvi.io.kafka_core.TransactionalSink`)."""

    def _create_producer(self) -> KafkaProducer:
        options = transactional_producer_options(
            self._settings, self._transactional_id, self._transaction_timeout_ms
        )
        return KafkaProducer(**options)

    def _init_transactions(self) -> None:
        self._producer.init_transactions()

    def _commit(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        self._producer.send_offsets_to_transaction(to_kafka_offsets(offsets), group_metadata)
        self._producer.commit_transaction()

    def _abort(self) -> None:
        self._producer.abort_transaction()

    def _abandon(self, producer: Any) -> None:
        with contextlib.suppress(KafkaError):
            producer.close(timeout=1)
