"""The Kafka output sinks: one idempotence-safe producer for latents, metrics and dead letters, and
its transactional variant for exactly-once processing."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from streamvi.config import KafkaSettings
from streamvi.errors import CommitError, OutputError
from streamvi.io.base import OutputMessage, OutputSink, Partition

log = logging.getLogger(__name__)


class KafkaOutputSink(OutputSink):
    """Sends asynchronously in batches; ``flush`` waits for acks and raises if any send failed."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._producer = self._create_producer(settings)
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self.sent = 0

    def _create_producer(self, settings: KafkaSettings, **extra: Any) -> KafkaProducer:
        compression = None if settings.producer_compression == "none" else settings.producer_compression
        options: dict[str, Any] = dict(
            settings.client_options(),
            acks="all",
            linger_ms=settings.producer_linger_ms,
            batch_size=settings.producer_batch_bytes,
            compression_type=compression,
            retries=5,
            max_in_flight_requests_per_connection=1,
        )
        options.update(extra)
        return KafkaProducer(**options)

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = exc

    def send(self, message: OutputMessage) -> None:
        future = self._producer.send(
            message.topic, value=message.value, key=message.key, headers=message.headers or None
        )
        future.add_errback(self._failed)
        self.sent += 1

    def flush(self, timeout_seconds: float | None = None) -> None:
        try:
            self._producer.flush(timeout=timeout_seconds)
        except KafkaError as exc:
            raise OutputError(f"flushing outputs failed: {exc}") from exc
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise OutputError(f"an output message was not delivered: {failure}")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()

    @property
    def producer(self) -> Any:
        return self._producer


class KafkaTransactionalSink(KafkaOutputSink):
    """Every output between two checkpoints is in one Kafka transaction, committed together with
    the consumed offsets (``send_offsets_to_transaction``); read_committed consumers see a
    checkpoint interval's outputs all at once or, if it is aborted, never.

    A new transaction begins with the first send after a commit or abort. On start,
    ``init_transactions`` fences any earlier producer with the same transactional id (a crashed
    instance) and aborts its open transaction.
    """

    transactional = True

    def __init__(self, settings: KafkaSettings, transactional_id: str, transaction_timeout_ms: int) -> None:
        self._settings = settings
        self._transactional_id = transactional_id
        self._transaction_timeout_ms = transaction_timeout_ms
        self._in_transaction = False
        self._fenced = False  # the producer was dropped; a new one is needed before the next send
        super().__init__(settings)
        self._producer.init_transactions()

    def _create_producer(self, settings: KafkaSettings, **extra: Any) -> KafkaProducer:
        return super()._create_producer(
            settings,
            transactional_id=self._transactional_id,
            transaction_timeout_ms=self._transaction_timeout_ms,
            enable_idempotence=True,
            retries=float("inf"),
            **extra,
        )

    def _begin(self) -> None:
        delay = 0.5
        while self._fenced:  # the broker may still be unreachable: retry with back-off
            try:
                self._producer = self._create_producer(self._settings)
                self._producer.init_transactions()
                self._fenced = False
            except KafkaError as exc:
                log.warning("restarting the transactional producer failed (%s); retry in %.1fs", exc, delay)
                with contextlib.suppress(Exception):
                    self._producer.close(timeout=0)
                time.sleep(delay)
                delay = min(10.0, 2 * delay)
        if not self._in_transaction:
            self._producer.begin_transaction()
            self._in_transaction = True

    def send(self, message: OutputMessage) -> None:
        try:
            self._begin()
        except KafkaError as exc:
            raise OutputError(f"beginning a transaction failed: {exc}") from exc
        super().send(message)

    def commit_transaction(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        from streamvi.io.kafka_source import to_kafka_offsets

        try:
            self._begin()
            self._producer.send_offsets_to_transaction(to_kafka_offsets(offsets), group_metadata)
            self._producer.commit_transaction()
        except KafkaError as exc:
            raise CommitError(f"committing the transaction {self._transactional_id} failed: {exc}") from exc
        self._in_transaction = False
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:  # cannot happen after a successful commit; kept as a guard
            raise OutputError(f"an output message was not delivered: {failure}")

    def abort_transaction(self) -> None:
        with self._lock:
            self._failure = None
        if not self._in_transaction:
            return
        self._in_transaction = False
        try:
            self._producer.abort_transaction()
            return
        except KafkaError as exc:
            log.warning("aborting transaction failed (%s); starting a new producer to fence it", exc)
        # A fresh producer with the same transactional id (made before the next send) fences this
        # one; the broker aborts its open transaction during init_transactions.
        self._fenced = True
        with contextlib.suppress(KafkaError):
            self._producer.close(timeout=1)

    def close(self) -> None:
        try:
            if self._in_transaction:
                self.abort_transaction()
        finally:
            if not self._fenced:
                self._producer.close()
