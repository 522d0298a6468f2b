"""The librdkafka output sinks: an idempotent producer for latents, metrics and dead letters, and its
transactional variant for exactly-once processing. Same contracts as the kafka-python sinks: flush,
close, the failure latch and the transaction lifecycle are :mod:`streamvi.io.kafka_core`'s.

librdkafka batches, compresses and sends from its own threads; ``send`` only queues a message
(about a microsecond), and only failed deliveries call back into Python.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streamvi.io.base import OutputMessage, Partition
from streamvi.io.kafka_core import KafkaSink, TransactionalSink
from streamvi.io.rdkafka_options import rdkafka_config, transactional_config
from streamvi.io.rdkafka_source import CLIENT_LOG, kafka_error, to_topic_partitions

log = logging.getLogger(__name__)

#: How long ``send`` lets librdkafka work before trying again when its local queue is full.
_QUEUE_FULL_WAIT_SECONDS = 0.05

#: Errors after which a transactional producer can no longer be used: another instance with the
#: same transactional id took over (or the broker says this producer's epoch is stale). Apache
#: Kafka's fencing reaches librdkafka as a fatal error; the embedded broker's as an abortable one.
_FENCED = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})


def _headers(message: OutputMessage) -> list[tuple[str, str | bytes | None]]:
    """The message's headers as confluent-kafka types them (its element type is wider than ours)."""
    return cast("list[tuple[str, str | bytes | None]]", message.headers)


class RdKafkaOutputSink(KafkaSink):
    """Queues messages in librdkafka; ``flush`` waits for every ack and raises if any send failed.

    The producer is idempotent: librdkafka's retries never duplicate or reorder a message. A fatal
    producer error fails the next ``flush``, and the next send starts a new producer.
    """

    _log = log
    _client_error = KafkaException

    def _config(self) -> dict[str, Any]:
        config = rdkafka_config(self._settings, "producer")
        config.update(
            {
                "on_delivery": self._delivered,
                "delivery.report.only.error": True,  # successes cost no Python call
                "error_cb": self._error,
                "logger": CLIENT_LOG,
            }
        )
        return config

    def _create_producer(self) -> Producer:
        return Producer(self._config())

    # -- librdkafka callbacks (served by poll/flush on the calling thread) --------------------------
    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._latch.failed(f"{message.topic()}: {error.str()} ({error.name()})", fatal=error.fatal())

    def _error(self, error: KafkaError) -> None:
        if error.fatal():
            log.error("Kafka producer, fatal: %s", error.str())
            self._latch.failed(f"{error.str()} ({error.name()})", fatal=True)
        elif error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            log.debug("Kafka producer: %s", error.str())  # librdkafka logs these itself
        else:
            log.warning("Kafka producer: %s (%s)", error.str(), error.name())

    # -- the interface -----------------------------------------------------------------------------
    def send(self, message: OutputMessage) -> None:
        self._ready()
        self._produce(message)
        self._producer.poll(0)

    def send_many(self, messages: Sequence[OutputMessage]) -> None:
        self._ready()
        produce = self._producer.produce
        for message in messages:
            try:
                if message.headers:
                    produce(message.topic, message.value, message.key, headers=_headers(message))
                else:
                    produce(message.topic, message.value, message.key)
            except (BufferError, KafkaException):
                self._produce(message)  # the slow path: waits for room, or records the failure
        self._producer.poll(0)

    def _produce(self, message: OutputMessage) -> None:
        """Queue one message, waiting while librdkafka's queue is full: a message is never dropped.

        A message librdkafka refuses outright (too large, unknown topic, producer failed) is a
        delivery failure that the next ``flush`` reports.
        """
        while True:
            try:
                if message.headers:
                    self._producer.produce(
                        message.topic, message.value, message.key, headers=_headers(message)
                    )
                else:
                    self._producer.produce(message.topic, message.value, message.key)
            except BufferError:
                self._producer.poll(_QUEUE_FULL_WAIT_SECONDS)
                continue
            except KafkaException as exc:
                error = kafka_error(exc)
                self._latch.failed(f"{message.topic}: {exc}", fatal=error is not None and error.fatal())
            return

    def _ready(self) -> None:
        """Replace a producer that hit a fatal error (its failure was reported by ``flush``)."""
        if self._latch.take_unusable():
            log.warning("starting a new Kafka producer after a fatal error")
            self._discard(self._producer)
            self._producer = self._create_producer()

    def _flush(self, timeout_seconds: float | None) -> int:
        return int(self._producer.flush(-1 if timeout_seconds is None else timeout_seconds))

    def _undeliverable(self) -> None:
        # Undeliverable now; a restart outputs them again. Closing must not wait for them.
        self._discard(self._producer)

    def _discard(self, producer: Producer) -> None:
        """Empty a producer that will not be used again. It is not closed: ``close`` would abort its
        transaction and flush, waiting on a broker that fenced it or cannot be reached; librdkafka
        destroys it without waiting once the last reference to it goes."""
        with contextlib.suppress(KafkaException, RuntimeError):
            producer.purge(in_queue=True, in_flight=True, blocking=False)


class RdKafkaTransactionalSink(TransactionalSink, RdKafkaOutputSink):
    """librdkafka's transactional producer (see :class:`~streamvi.io.kafka_core.TransactionalSink`).
    A producer that fails in a way librdkafka cannot abort is replaced like a fenced one."""

    _fenced_delivery = False  # a send of the open transaction failed because the producer was fenced

    def _create_producer(self) -> Producer:
        self._fenced_delivery = False
        return super()._create_producer()

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        # A fenced producer's sends fail first; the commit after them fails only with "erroneous
        # state", so the fencing is remembered here.
        if error is not None and error.code() in _FENCED:
            self._fenced_delivery = True
        super()._delivered(error, message)

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config.update(
            transactional_config(self._settings, self._transactional_id, self._transaction_timeout_ms)
        )
        return config

    @property
    def _timeout(self) -> float:
        """Transactional calls may wait as long as the broker keeps a transaction open."""
        return self._transaction_timeout_ms / 1000.0

    def _init_transactions(self) -> None:
        self._producer.init_transactions(self._timeout)

    def _commit(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        self._retrying(
            "sending offsets to the transaction",
            lambda: self._producer.send_offsets_to_transaction(
                to_topic_partitions(offsets), group_metadata, self._timeout
            ),
        )
        self._retrying("committing the transaction", lambda: self._producer.commit_transaction(self._timeout))

    def _retrying(self, what: str, call: Callable[[], None]) -> None:
        """Run a transactional call again (after ``backoff.initial_seconds``) while librdkafka says
        it may succeed on retry (a timeout, a coordinator moving): giving up on a commit whose
        outcome is unknown could make the visible outputs and the trusted snapshot disagree."""
        while True:
            try:
                call()
                return
            except KafkaException as exc:
                error = kafka_error(exc)
                if error is None or not error.retriable() or error.fatal() or error.txn_requires_abort():
                    raise
                log.warning("%s: %s; retrying", what, error.str())
                time.sleep(self._backoff.initial_seconds)

    def _unrecoverable(self, exc: Exception) -> bool:
        error = kafka_error(exc) if isinstance(exc, KafkaException) else None
        return self._fenced_delivery or (error is not None and (error.fatal() or error.code() in _FENCED))

    def _abort(self) -> None:
        self._producer.abort_transaction(self._timeout)

    def _abandon(self, producer: Producer) -> None:
        self._discard(producer)

    def flush(self, timeout_seconds: float | None = None) -> None:
        if self._fenced:
            # The producer was dropped while the loop rewound: nothing of this interval is queued.
            self._latch.raise_if_failed()
            return
        super().flush(timeout_seconds)
