"""The Kafka output sink: one idempotence-safe producer for latents, metrics and dead letters."""

from __future__ import annotations

import threading
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from streamvi.config import KafkaSettings
from streamvi.errors import OutputError
from streamvi.io.base import OutputMessage, OutputSink


class KafkaOutputSink(OutputSink):
    """Sends asynchronously in batches; ``flush`` waits for acks and raises if any send failed."""

    def __init__(self, settings: KafkaSettings) -> None:
        compression = None if settings.producer_compression == "none" else settings.producer_compression
        self._producer = KafkaProducer(
            **settings.client_options(),
            acks="all",
            linger_ms=settings.producer_linger_ms,
            batch_size=settings.producer_batch_bytes,
            compression_type=compression,
            retries=5,
            max_in_flight_requests_per_connection=1,
        )
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self.sent = 0

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
