"""The librdkafka output sinks: an idempotent producer for latents, metrics and dead letters, and its
transactional variant for exactly-once processing. Same contracts as the kafka-python sinks.

librdkafka batches, compresses and sends from its own threads; ``send`` only queues a message
(about a microsecond), and only failed deliveries call back into Python.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streamvi.config import KafkaSettings
from streamvi.errors import CommitError, OutputError
from streamvi.io.base import OutputMessage, OutputSink, Partition
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


class RdKafkaOutputSink(OutputSink):
    """Queues messages in librdkafka; ``flush`` waits for every ack and raises if any send failed.

    The producer is idempotent: librdkafka's retries never duplicate or reorder a message. A fatal
    producer error fails the next ``flush``, and the next send starts a new producer.
    """

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._failure: str | None = None  # the first delivery failure since the last flush
        self._unusable = False  # a fatal error: the next send needs a new producer
        self.sent = 0
        self._producer = self._create_producer()

    def _config(self) -> dict[str, Any]:
        config = self._settings.rdkafka_config("producer")
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
            self._failed(f"{message.topic()}: {error.str()} ({error.name()})", fatal=error.fatal())

    def _error(self, error: KafkaError) -> None:
        if error.fatal():
            log.error("Kafka producer, fatal: %s", error.str())
            self._failed(f"{error.str()} ({error.name()})", fatal=True)
        elif error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            log.debug("Kafka producer: %s", error.str())  # librdkafka logs these itself
        else:
            log.warning("Kafka producer: %s (%s)", error.str(), error.name())

    def _failed(self, reason: str, fatal: bool = False) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = reason
            if fatal:
                self._unusable = True

    # -- the interface -----------------------------------------------------------------------------
    def send(self, message: OutputMessage) -> None:
        self._ready()
        self._produce(message)
        self._producer.poll(0)

    def send_many(self, messages: Sequence[OutputMessage]) -> None:
        self._ready()
        produce = self._producer.produce
        count = 0
        for message in messages:
            try:
                if message.headers:
                    produce(message.topic, message.value, message.key, headers=_headers(message))
                else:
                    produce(message.topic, message.value, message.key)
            except (BufferError, KafkaException):
                self._produce(message)  # the slow path: waits for room, or records the failure
                continue
            count += 1
        self.sent += count
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
                self._failed(f"{message.topic}: {exc}", fatal=error is not None and error.fatal())
            self.sent += 1
            return

    def _ready(self) -> None:
        """Replace a producer that hit a fatal error (its failure was reported by ``flush``)."""
        if self._unusable:
            with self._lock:
                self._unusable = False
            log.warning("starting a new Kafka producer after a fatal error")
            self._discard(self._producer)
            self._producer = self._create_producer()

    def flush(self, timeout_seconds: float | None = None) -> None:
        try:
            remaining = self._producer.flush(-1 if timeout_seconds is None else timeout_seconds)
        except KafkaException as exc:
            raise OutputError(f"flushing outputs failed: {exc}") from exc
        self._raise_failure()
        if remaining:
            raise OutputError(f"{remaining} output messages were not delivered within {timeout_seconds}s")

    def _raise_failure(self) -> None:
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise OutputError(f"an output message was not delivered: {failure}")

    def close(self) -> None:
        try:
            self.flush()
        except BaseException:
            # Undeliverable now; a restart outputs them again. Closing must not wait for them.
            self._discard(self._producer)
            raise
        finally:
            self._producer.close()

    @staticmethod
    def _discard(producer: Producer) -> None:
        """Empty a producer that will not be used again. It is not closed: ``close`` would abort its
        transaction and flush, waiting on a broker that fenced it or cannot be reached; librdkafka
        destroys it without waiting once the last reference to it goes."""
        with contextlib.suppress(KafkaException, RuntimeError):
            producer.purge(in_queue=True, in_flight=True, blocking=False)

    @property
    def producer(self) -> Producer:
        return self._producer


class RdKafkaTransactionalSink(RdKafkaOutputSink):
    """Every output between two checkpoints is in one Kafka transaction, committed together with
    the consumed offsets (``send_offsets_to_transaction``); read_committed consumers see a
    checkpoint interval's outputs all at once or, if it is aborted, never.

    A new transaction begins with the first send after a commit or abort. On start,
    ``init_transactions`` fences any earlier producer with the same transactional id (a crashed
    instance) and aborts its open transaction. A producer that is fenced, or that fails in a way
    librdkafka cannot abort, is replaced before the next send by a new one with the same id.
    """

    transactional = True

    def __init__(self, settings: KafkaSettings, transactional_id: str, transaction_timeout_ms: int) -> None:
        self._transactional_id = transactional_id
        self._transaction_timeout_ms = transaction_timeout_ms
        #: Transactional calls may wait as long as the broker keeps a transaction open.
        self._timeout = transaction_timeout_ms / 1000.0
        self._in_transaction = False
        self._fenced = False  # the producer was dropped; a new one is needed before the next send
        super().__init__(settings)
        try:
            self._producer.init_transactions(self._timeout)
        except BaseException:
            self._discard(self._producer)
            raise

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config.update(
            {
                "transactional.id": self._transactional_id,
                "transaction.timeout.ms": self._transaction_timeout_ms,
                # librdkafka refuses a request timeout longer than the transaction it belongs to
                "socket.timeout.ms": min(self._settings.request_timeout_ms, self._transaction_timeout_ms),
            }
        )
        return config

    def _ready(self) -> None:
        try:
            self._begin()
        except KafkaException as exc:
            raise OutputError(f"beginning a transaction failed: {exc}") from exc

    def _begin(self) -> None:
        """Have an open transaction: first a working producer (after fencing, with back-off while
        the broker is unreachable), then ``begin_transaction`` if none is open.

        A fatal error in the middle of a transaction is not repaired here: it fails the next
        ``flush`` or commit, the loop aborts and rewinds, and the failed abort drops the producer.
        """
        delay = 0.5
        while self._fenced:
            try:
                self._producer = self._create_producer()
                self._producer.init_transactions(self._timeout)
                self._fenced = False
                with self._lock:
                    self._unusable = False
            except KafkaException as exc:
                log.warning("restarting the transactional producer failed (%s); retry in %.1fs", exc, delay)
                self._discard(self._producer)
                time.sleep(delay)
                delay = min(10.0, 2 * delay)
        if not self._in_transaction:
            self._producer.begin_transaction()
            self._in_transaction = True

    def commit_transaction(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        try:
            self._begin()  # offsets need a transaction even when the interval sent nothing
            self._retrying(
                "sending offsets to the transaction",
                lambda: self._producer.send_offsets_to_transaction(
                    to_topic_partitions(offsets), group_metadata, self._timeout
                ),
            )
            self._retrying(
                "committing the transaction", lambda: self._producer.commit_transaction(self._timeout)
            )
        except KafkaException as exc:
            error = kafka_error(exc)
            if error is not None and (error.fatal() or error.code() in _FENCED):
                self._drop_producer()
            raise CommitError(f"committing the transaction {self._transactional_id} failed: {exc}") from exc
        self._in_transaction = False
        self._raise_failure()  # cannot happen after a successful commit; kept as a guard

    @staticmethod
    def _retrying(what: str, call: Callable[[], None]) -> None:
        """Run a transactional call again while librdkafka says it may succeed on retry (a timeout,
        a coordinator moving): giving up on a commit whose outcome is unknown could make the
        visible outputs and the trusted snapshot disagree."""
        while True:
            try:
                call()
                return
            except KafkaException as exc:
                error = kafka_error(exc)
                if error is None or not error.retriable() or error.fatal() or error.txn_requires_abort():
                    raise
                log.warning("%s: %s; retrying", what, error.str())
                time.sleep(0.5)

    def abort_transaction(self) -> None:
        with self._lock:
            self._failure = None
        if not self._in_transaction:
            return
        self._in_transaction = False
        try:
            self._producer.abort_transaction(self._timeout)
            return
        except KafkaException as exc:
            log.warning("aborting transaction failed (%s); starting a new producer to fence it", exc)
        # A fresh producer with the same transactional id (made before the next send) fences this
        # one; the broker aborts its open transaction during init_transactions.
        self._drop_producer()

    def _drop_producer(self) -> None:
        self._in_transaction = False
        if not self._fenced:
            self._fenced = True
            self._discard(self._producer)

    def flush(self, timeout_seconds: float | None = None) -> None:
        if self._fenced:
            # The producer was dropped while the loop rewound: nothing of this interval is queued.
            self._raise_failure()
            return
        super().flush(timeout_seconds)

    def close(self) -> None:
        try:
            if self._in_transaction:
                self.abort_transaction()
        finally:
            if not self._fenced:
                self._producer.close()
