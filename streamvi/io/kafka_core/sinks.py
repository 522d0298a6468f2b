"""The producer side of the core: the failure latch, flush and close, and the transaction lifecycle."""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from streamvi.config import KafkaSettings
from streamvi.errors import CommitError, OutputError
from streamvi.io.base import OutputSink, Partition


class FailureLatch:
    """The first delivery failure since the last flush (later ones add nothing), and whether the
    client said its producer can no longer be used. Set from the client's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._unusable = False

    def failed(self, reason: object, fatal: bool = False) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = str(reason)
            if fatal:
                self._unusable = True

    def clear(self) -> None:
        with self._lock:
            self._failure = None

    def raise_if_failed(self) -> None:
        """Raise the failure (once) if there was one since the last call."""
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise OutputError(f"an output message was not delivered: {failure}")

    def pending(self) -> str | None:
        """The failure not yet raised, if any (left in place)."""
        with self._lock:
            return self._failure

    def take_unusable(self) -> bool:
        """Whether the producer became unusable since the last call."""
        with self._lock:
            unusable, self._unusable = self._unusable, False
        return unusable


@dataclass(frozen=True)
class Backoff:
    """Waits between attempts while the broker is unreachable (``processing.retry_*_seconds``):
    ``initial_seconds``, doubling up to ``max_seconds``."""

    initial_seconds: float = 0.5
    max_seconds: float = 10.0

    def delays(self) -> Iterator[float]:
        delay = min(self.initial_seconds, self.max_seconds)
        while True:
            yield delay
            delay = min(self.max_seconds, 2 * delay)


class KafkaSink(OutputSink):
    """A producer that sends asynchronously; ``flush`` waits for every ack and raises if any send
    failed since the last flush (the latch), once."""

    _log: ClassVar[logging.Logger]
    #: The client library's error type.
    _client_error: ClassVar[type[Exception]]

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._latch = FailureLatch()
        self._closed = False
        self._producer = self._create_producer()

    @abstractmethod
    def _create_producer(self) -> Any:
        """A new producer of the client library."""

    @abstractmethod
    def _flush(self, timeout_seconds: float | None) -> int:
        """Wait for every ack; how many messages are still undelivered at the timeout."""

    def _ready(self) -> None:
        """Before a send: have a producer that can take it."""

    @abstractmethod
    def _discard(self, producer: Any) -> None:
        """Let go of a producer that will not be used again, without waiting on the broker."""

    @property
    def producer(self) -> Any:
        return self._producer

    def flush(self, timeout_seconds: float | None = None) -> None:
        try:
            remaining = self._flush(timeout_seconds)
        except self._client_error as exc:
            raise OutputError(f"flushing outputs failed: {exc}") from exc
        self._latch.raise_if_failed()
        if remaining:
            raise OutputError(f"{remaining} output messages were not delivered within {timeout_seconds}s")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        except BaseException:
            self._undeliverable()
            raise
        finally:
            self._producer.close()

    def _undeliverable(self) -> None:
        """Closing after a failed flush: what is still queued may be dropped (by default it is not)."""


class TransactionalSink(KafkaSink):
    """Every output between two checkpoints is in one Kafka transaction, committed together with
    the consumed offsets (``send_offsets_to_transaction``); read_committed consumers see a
    checkpoint interval's outputs all at once or, if it is aborted, never.

    A new transaction begins with the first send after a commit or abort. On start,
    ``init_transactions`` fences any earlier producer with the same transactional id (a crashed
    instance) and aborts its open transaction. A producer that is fenced, or whose abort failed, is
    replaced before the next send by a new one with the same id; while the broker cannot be reached
    that is tried again after each of ``backoff``'s delays.
    """

    transactional = True

    def __init__(
        self,
        settings: KafkaSettings,
        transactional_id: str,
        transaction_timeout_ms: int,
        backoff: Backoff | None = None,
    ) -> None:
        self._transactional_id = transactional_id
        self._transaction_timeout_ms = transaction_timeout_ms
        self._backoff = backoff if backoff is not None else Backoff()
        self._in_transaction = False
        self._fenced = False  # the producer was dropped; a new one is needed before the next send
        super().__init__(settings)
        try:
            self._init_transactions()
        except BaseException:
            self._discard(self._producer)
            raise

    @abstractmethod
    def _init_transactions(self) -> None:
        """Register the transactional id (fencing earlier producers with it)."""

    @abstractmethod
    def _commit(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        """Add ``offsets`` to the open transaction and commit it."""

    @abstractmethod
    def _abort(self) -> None:
        """Abort the open transaction."""

    @abstractmethod
    def _abandon(self, producer: Any) -> None:
        """Let go of a producer fenced or failed in the middle of a transaction."""

    def _unrecoverable(self, exc: Exception) -> bool:
        """Whether a failed commit left the producer unusable (fenced, or a fatal error)."""
        return False

    def _ready(self) -> None:
        try:
            self._begin()
        except self._client_error as exc:
            raise OutputError(f"beginning a transaction failed: {exc}") from exc

    def _begin(self) -> None:
        """Have an open transaction: first a working producer (after fencing, with back-off while
        the broker is unreachable), then ``begin_transaction`` if none is open.

        A fatal error in the middle of a transaction is not repaired here: it fails the next
        ``flush`` or commit, the loop aborts and rewinds, and the failed abort drops the producer.
        """
        delays = self._backoff.delays()
        while self._fenced:
            try:
                self._producer = self._create_producer()
                self._init_transactions()
                self._fenced = False
                self._latch.take_unusable()
            except self._client_error as exc:
                delay = next(delays)
                self._log.warning(
                    "restarting the transactional producer failed (%s); retry in %.1fs", exc, delay
                )
                self._discard(self._producer)
                time.sleep(delay)
        if not self._in_transaction:
            self._producer.begin_transaction()
            self._in_transaction = True

    def commit_transaction(self, offsets: Mapping[Partition, int], group_metadata: object) -> None:
        try:
            self._begin()  # offsets need a transaction even when the interval sent nothing
            self._commit(offsets, group_metadata)
        except self._client_error as exc:
            if self._unrecoverable(exc):
                self._drop_producer()
            earlier = self._latch.pending()
            cause = f"; before it, {earlier}" if earlier is not None else ""
            raise CommitError(
                f"committing the transaction {self._transactional_id} failed: {exc}{cause}"
            ) from exc
        self._in_transaction = False
        self._latch.raise_if_failed()  # cannot happen after a successful commit; kept as a guard

    def abort_transaction(self) -> None:
        self._latch.clear()
        if not self._in_transaction:
            return
        self._in_transaction = False
        try:
            self._abort()
            return
        except self._client_error as exc:
            self._log.warning("aborting transaction failed (%s); starting a new producer to fence it", exc)
        # A fresh producer with the same transactional id (made before the next send) fences this
        # one; the broker aborts its open transaction during init_transactions.
        self._drop_producer()

    def _drop_producer(self) -> None:
        self._in_transaction = False
        if not self._fenced:
            self._fenced = True
            self._abandon(self._producer)

    def close(self) -> None:
        try:
            if self._in_transaction:
                self.abort_transaction()
        finally:
            if not self._fenced:
                self._producer.close()
