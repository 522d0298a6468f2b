"""The kafka-python and librdkafka sources and sinks held, on the embedded broker, to the contract of
every RecordSource and OutputSink (tests/contract/checks.py), which the in-memory ones meet too
(tests/unit/test_io_contract.py)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from streamvi.config import KafkaSettings
from streamvi.io.admin import ensure_topics
from streamvi.io.base import OutputMessage, OutputSink, Partition, RawRecord, RecordSource
from streamvi.io.kafka_sink import KafkaOutputSink, KafkaTransactionalSink
from streamvi.io.kafka_source import KafkaRecordSource
from streamvi.io.rdkafka_sink import RdKafkaOutputSink, RdKafkaTransactionalSink
from streamvi.io.rdkafka_source import RdKafkaRecordSource
from tests.contract.checks import SINK_CHECKS, SOURCE_CHECKS, Seen, check_id
from tests.integration.conftest import committed_offsets
from tests.integration.faultkit import read_committed_emulated

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: For each client library: its record source, plain sink and transactional sink.
CLIENTS: dict[str, tuple[type[RecordSource], type[OutputSink], type[OutputSink]]] = {
    "kafka-python": (KafkaRecordSource, KafkaOutputSink, KafkaTransactionalSink),
    "librdkafka": (RdKafkaRecordSource, RdKafkaOutputSink, RdKafkaTransactionalSink),
}

#: Where an adapter breaks the contract today: (check, client) -> why. Each is expected to fail
#: (strictly: a fix makes the test fail until the entry goes).
KNOWN_GAPS = {
    ("rebalance_hooks_run_on_the_polling_thread", "kafka-python"): (
        "kafka-python 3 calls a (synchronous) rebalance listener on its IO thread, not inside poll"
    ),
    ("a_partition_kept_through_a_rebalance_resumes_at_the_committed_offset", "kafka-python"): (
        "kafka-python 3 keeps its fetch position for a partition assigned to it again by an eager "
        "rebalance (the Java client and librdkafka start over at the committed offset)"
    ),
    ("a_revocation_hook_may_commit", "kafka-python"): (
        "kafka-python 3 refuses a blocking commit from its IO thread, where the revocation hook "
        "runs (RuntimeError: Cannot block on net.run() from the IO thread itself)"
    ),
    ("an_undeliverable_message_fails_the_next_flush_once", "kafka-python"): (
        "kafka-python's send raises MessageSizeTooLargeError at once for a message over "
        "max_request_size instead of failing the next flush"
    ),
}

_transactional_ids = itertools.count()


class KafkaSourceWorld:
    """A two-partition input topic on the embedded broker, read by one client library's source."""

    partitions = 2
    can_rebalance = True

    def __init__(self, kafka: KafkaSettings, source_type: type[RecordSource]) -> None:
        self.kafka = kafka
        self.topic = kafka.input_topic
        self._source_type = source_type
        ensure_topics(kafka, [self.topic])

    def produce(self, per_partition: int) -> dict[Partition, list[RawRecord]]:
        producer = KafkaProducer(bootstrap_servers=self.kafka.bootstrap_servers, acks="all")
        written: dict[Partition, list[RawRecord]] = {}
        try:
            for number in range(self.partitions):
                for i in range(per_partition):
                    key = None if i % 3 == 0 else b"k%d-%d" % (number, i)
                    headers = [("n", b"%d" % i)] if i % 2 else []
                    meta = producer.send(
                        self.topic, key=key, value=b"v%d" % i, headers=headers or None, partition=number
                    ).get(timeout=30)
                    record = RawRecord(self.topic, number, meta.offset, key, b"v%d" % i, headers)
                    written.setdefault((self.topic, number), []).append(record)
        finally:
            producer.close()
        return written

    def source(self) -> RecordSource:
        return self._source_type(self.kafka)  # type: ignore[call-arg]


class KafkaSinkWorld:
    """An output topic on the embedded broker, read back as a read_committed consumer sees it
    (decided from the transaction markers, which the embedded broker does not filter on)."""

    def __init__(self, kafka: KafkaSettings, client: str) -> None:
        self.kafka = kafka
        self.client = client
        self.topic = kafka.latents_topic
        self.partition = (kafka.input_topic, 0)
        self.bootstrap = kafka.bootstrap_servers[0]
        _, self._plain, self._transactional = CLIENTS[client]
        ensure_topics(kafka)
        self._consumer: Any
        if client == "librdkafka":
            self._consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": kafka.group_id})
            self._metadata = self._consumer.consumer_group_metadata()
        else:
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=kafka.group_id)
            self._metadata = self._consumer.group_metadata()

    def sink(self, transactional: bool) -> OutputSink:
        if not transactional:
            return self._plain(self.kafka)  # type: ignore[call-arg]
        transactional_id = f"tx-{self.kafka.group_id}-{next(_transactional_ids)}"
        return self._transactional(self.kafka, transactional_id, 60_000)  # type: ignore[call-arg]

    def group_metadata(self) -> object:
        return self._metadata

    def visible(self, expected: int) -> list[Seen]:
        messages = read_committed_emulated(self.bootstrap, self.topic, expected=expected)
        return [(m.key, m.value, list(m.headers)) for m in messages]

    def committed(self) -> dict[Partition, int]:
        try:
            return committed_offsets(self.bootstrap, self.kafka.group_id)
        except (KafkaError, KeyError):  # no such group yet: nothing committed
            return {}

    def undeliverable(self) -> OutputMessage | None:
        return OutputMessage(self.topic, None, b"x" * 2_000_000)  # over the producer's size limit

    def close(self) -> None:
        self._consumer.close()


@pytest.fixture
def sink_world(settings_factory, request) -> Iterator[KafkaSinkWorld]:
    client = request.param
    world = KafkaSinkWorld(settings_factory(f"kafka.client={client}").kafka, client)
    try:
        yield world
    finally:
        world.close()


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("check", SOURCE_CHECKS, ids=check_id)
def test_kafka_source(
    check: Callable[[KafkaSourceWorld], None], client: str, settings_factory, request
) -> None:
    _known_gap(request, check, client)
    kafka = settings_factory(f"kafka.client={client}", "kafka.topic_partitions=2").kafka
    check(KafkaSourceWorld(kafka, CLIENTS[client][0]))


@pytest.mark.parametrize("sink_world", CLIENTS, indirect=True)
@pytest.mark.parametrize("check", SINK_CHECKS, ids=check_id)
def test_kafka_sink(check: Callable[[KafkaSinkWorld], None], sink_world: KafkaSinkWorld, request) -> None:
    _known_gap(request, check, sink_world.client)
    check(sink_world)


def _known_gap(request: pytest.FixtureRequest, check: Callable[..., None], client: str) -> None:
    reason = KNOWN_GAPS.get((check_id(check), client))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
