"""The librdkafka record source: a confluent-kafka group consumer with the semantics of the kafka-python one.

librdkafka fetches and decodes records in its own threads, ahead of the loop, so taking a record
costs the loop about a microsecond. Offsets are committed only when the loop says so, and a
partition assigned with a snapshot offset starts there.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence

import orjson
from confluent_kafka import (
    OFFSET_INVALID,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from streamvi.config import KafkaSettings
from streamvi.io.base import Partition, RawRecord
from streamvi.io.kafka_core import GroupSource, Liveness
from streamvi.io.rdkafka_options import rdkafka_config

log = logging.getLogger(__name__)

#: librdkafka's own log lines go to this logger (rather than straight to stderr).
CLIENT_LOG = logging.getLogger("rdkafka")

#: How often librdkafka reports its statistics; ``connected`` reads broker liveness from them.
STATS_INTERVAL_MS = 1_000

#: The most records one ``consume`` call may return.
_MAX_CONSUME = 1_000_000

#: Errors in a fetched message that the loop cannot work around: consuming stops with an error.
_FATAL_FETCH_ERRORS = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
    }
)


def kafka_error(exc: KafkaException) -> KafkaError | None:
    """The ``KafkaError`` a librdkafka exception carries, if any."""
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else None


class RdKafkaRecordSource(GroupSource):
    """Consumes ``kafka.input_topic`` through librdkafka; offsets are committed only when told to.

    Rebalances are eager (range/round-robin assignors): every partition is revoked, then the new
    assignment is made. The rebalance callbacks run inside ``poll`` and ``keepalive``, on the
    polling thread, as with kafka-python. The group state, commit bookkeeping and keep-alive are
    :mod:`streamvi.io.kafka_core`'s.
    """

    _log = log

    def __init__(self, settings: KafkaSettings, isolation_level: str = "read_uncommitted") -> None:
        super().__init__(settings)
        self._closed = False
        # connected(): when the broker was last known to answer, written by the polling thread
        # (statistics, records, errors); a statistics report may be one interval old.
        self._liveness = Liveness(settings.heartbeat_interval_ms, STATS_INTERVAL_MS / 1000.0)
        config = rdkafka_config(settings, "consumer", isolation_level)
        config.update(
            {
                "statistics.interval.ms": STATS_INTERVAL_MS,
                "stats_cb": self._stats,
                "error_cb": self._error,
                "logger": CLIENT_LOG,
            }
        )
        self._consumer = Consumer(config)
        try:
            # Fail at start, naming the settings, when no broker answers (as kafka-python does).
            self._consumer.list_topics(settings.input_topic, timeout=settings.request_timeout_ms / 1000)
            self._consumer.subscribe(
                [settings.input_topic], on_assign=self._assign_callback, on_revoke=self._revoke_callback
            )
        except BaseException:
            self._consumer.close()
            self._closed = True
            raise

    # -- rebalance hooks, called by librdkafka from inside consume() on the loop's thread ----------
    def _assign_callback(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assigned: list[Partition] = []
        for tp in partitions:
            partition = (tp.topic, tp.partition)
            assigned.append(partition)
            offset = self.start_offset(partition)
            # OFFSET_INVALID: the committed offset, or the beginning without one
            tp.offset = OFFSET_INVALID if offset is None else offset
        consumer.assign(partitions)
        with self._rebalancing():
            self._on_assigned(assigned)

    def _revoke_callback(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        try:
            with self._rebalancing():
                self._on_revoked(revoked)
        finally:
            self.forget_revoked(revoked)
            consumer.unassign()

    # -- librdkafka callbacks: broker liveness and errors ------------------------------------------
    def _stats(self, text: str) -> None:
        """Statistics report: the broker last answered when its most recently active connection
        last received anything."""
        try:
            stats = orjson.loads(text)
        except orjson.JSONDecodeError:
            return
        idle = [
            broker["rxidle"] / 1e6
            for broker in stats.get("brokers", {}).values()
            if broker.get("state") == "UP" and broker.get("rxidle", -1) >= 0
        ]
        if idle:
            self._liveness.answered(time.monotonic() - min(idle))

    def _error(self, error: KafkaError) -> None:
        """Client-level error (not tied to a record). librdkafka retries on its own; all brokers down
        makes ``connected`` false at once."""
        code = error.code()
        if code == KafkaError._ALL_BROKERS_DOWN:
            self._liveness.lost()  # until a statistics report shows a broker answering
            log.warning("Kafka consumer: %s", error.str())
        elif error.fatal():
            log.error("Kafka consumer, fatal: %s", error.str())
        elif code == KafkaError._TRANSPORT:
            log.debug("Kafka consumer: %s", error.str())  # librdkafka logs these itself
        else:
            log.warning("Kafka consumer: %s (%s)", error.str(), error.name())

    # -- the interface -----------------------------------------------------------------------------
    def poll(self, timeout_seconds: float, max_records: int) -> list[RawRecord]:
        """Return what librdkafka has prefetched (up to ``max_records``) at once; wait up to
        ``timeout_seconds`` only when it has nothing."""
        consumer = self._consumer
        max_records = min(max_records, _MAX_CONSUME)
        messages = consumer.consume(max_records, 0)
        if not messages and timeout_seconds > 0:
            first = consumer.poll(timeout_seconds)
            if first is None:
                return []
            messages = [first]
            if max_records > 1:
                messages.extend(consumer.consume(max_records - 1, 0))
        if not messages:
            return []
        self._liveness.answered()
        records: list[RawRecord] = []
        append = records.append
        for message in messages:
            if message.error() is not None:
                self._fetch_error(message)
                continue
            timestamp_type, timestamp = message.timestamp()
            # a message without an error always has its topic, partition and offset
            append(
                RawRecord(
                    message.topic(),  # type: ignore[arg-type]
                    message.partition(),  # type: ignore[arg-type]
                    message.offset(),  # type: ignore[arg-type]
                    message.key(),
                    message.value(),
                    list(message.headers() or ()),  # type: ignore[arg-type]
                    timestamp if timestamp_type != TIMESTAMP_NOT_AVAILABLE else -1,
                )
            )
        return records

    def _fetch_error(self, message: Message) -> None:
        """A fetch error in the record stream: end of partition is no error, authorization and
        authentication failures stop consuming, anything else librdkafka retries by itself."""
        error = message.error()
        assert error is not None
        code = error.code()
        if code == KafkaError._PARTITION_EOF:
            return
        where = f"{message.topic()}:{message.partition()}"
        if error.fatal() or code in _FATAL_FETCH_ERRORS:
            raise self.settings.failure(KafkaException(error))
        log.warning("consuming %s: %s (%s); librdkafka retries", where, error.str(), error.name())

    def _commit(self, offsets: Mapping[Partition, int]) -> None:
        try:
            results = self._consumer.commit(offsets=to_topic_partitions(offsets), asynchronous=False)
        except KafkaException as exc:
            raise self._commit_error(exc) from exc
        failed = [tp for tp in results or () if tp.error is not None]
        if failed:
            raise self._commit_error(", ".join(f"{tp.topic}:{tp.partition}: {tp.error}" for tp in failed))

    def committed_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        if not partitions:
            return {}
        found = self._consumer.committed(
            [TopicPartition(topic, number) for topic, number in partitions],
            timeout=self.settings.request_timeout_ms / 1000,
        )
        return {
            (tp.topic, tp.partition): int(tp.offset) for tp in found if tp.error is None and tp.offset >= 0
        }

    def group_metadata(self) -> object:
        return self._consumer.consumer_group_metadata()

    def seek(self, offsets: Mapping[Partition, int]) -> None:
        self.rewind_to(offsets)
        assigned = self._consumer.assignment()
        if not assigned:
            return
        # OFFSET_INVALID: the group's committed offset, or the beginning of the partition without one
        targets = [
            TopicPartition(tp.topic, tp.partition, offsets.get((tp.topic, tp.partition), OFFSET_INVALID))
            for tp in assigned
        ]
        if self._in_rebalance:
            # Inside a rebalance callback librdkafka is changing the assignment itself: move what
            # can be moved; a partition revoked here starts from the start offsets when reassigned.
            for target in targets:
                if target.offset >= 0:
                    try:
                        self._consumer.seek(target)
                    except KafkaException as exc:
                        log.debug("seek %s:%d during a rebalance: %s", target.topic, target.partition, exc)
            return
        # Reassigning the same partitions sets every start position at once, whether or not a
        # partition's first fetch has started (seek() refuses those), and drops what was prefetched.
        self._consumer.assign(targets)

    # -- keep-alive: with every partition paused, a consume takes no record: it serves the group
    # (rebalance callbacks included) and restarts the max.poll.interval.ms clock. Pausing drops what
    # was prefetched; resuming fetches again from the next offset poll() has not returned.
    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        consumer = self._consumer
        paused = consumer.assignment()
        if paused:
            consumer.pause(paused)
        try:
            yield
        finally:
            if paused:
                current = {(tp.topic, tp.partition) for tp in consumer.assignment()}
                still = [tp for tp in paused if (tp.topic, tp.partition) in current]
                if still:
                    consumer.resume(still)

    def _poll_paused(self) -> list[tuple[Partition, int]]:
        stray: list[tuple[Partition, int]] = []
        for message in self._consumer.consume(1, 0):
            topic, number, offset = message.topic(), message.partition(), message.offset()
            if message.error() is None and topic is not None and number is not None and offset is not None:
                stray.append(((topic, number), offset))
        return stray

    def _seek_one(self, partition: Partition, offset: int) -> None:
        self._consumer.seek(TopicPartition(*partition, offset))

    def connected(self) -> bool:
        """Whether the broker answered within ~3 heartbeat intervals (at least 2 s), read from what
        its connections last received (librdkafka's statistics, every second) and from records
        arriving; false at once when librdkafka reports every broker down.

        The statistics are served by ``poll`` and ``keepalive``, so a loop stuck waiting on the
        broker reads as not connected too. A join that the coordinator holds for longer than that
        (a rebalance) reads as not connected for the moment, as with kafka-python, while no
        partition is assigned anyway. Reads one float: safe from any thread.
        """
        return self._liveness.alive()

    def assignment(self) -> list[Partition]:
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def highwater(self, partition: Partition) -> int | None:
        # cached=True: the high-water mark of the last fetch response, never a broker round trip
        try:
            _, high = self._consumer.get_watermark_offsets(TopicPartition(*partition), cached=True)
        except KafkaException:
            return None
        return int(high) if high is not None and high >= 0 else None

    def position(self, partition: Partition) -> int | None:
        # the fetch position librdkafka holds locally; negative (OFFSET_INVALID) until it is known
        try:
            (found,) = self._consumer.position([TopicPartition(*partition)])
        except KafkaException:
            return None
        return int(found.offset) if found.offset >= 0 else None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._consumer.close()


def to_topic_partitions(offsets: Mapping[Partition, int]) -> list[TopicPartition]:
    """librdkafka's form of ``{(topic, partition): offset}``."""
    return [TopicPartition(topic, number, offset) for (topic, number), offset in offsets.items()]
