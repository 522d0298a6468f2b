"""The daemon on librdkafka (``kafka.client=librdkafka``) against the embedded broker: the daemon,
delivery and fault tests of the kafka-python client, run again on the other client, plus the
librdkafka source and sinks on their own (rebalances, rewinds, transactions, fencing)."""

from __future__ import annotations

import logging
import time

import orjson
import pytest
from confluent_kafka import Consumer, Producer
from prometheus_client import CollectorRegistry

from streamvi.config import load_settings
from streamvi.errors import CommitError, StreamVIError
from streamvi.io.admin import ensure_topics
from streamvi.io.base import OutputMessage
from streamvi.io.embedded import free_port
from streamvi.io.rdkafka_options import rdkafka_config
from streamvi.io.rdkafka_sink import RdKafkaOutputSink, RdKafkaTransactionalSink
from streamvi.io.rdkafka_source import RdKafkaRecordSource
from streamvi.runtime import build_daemon
from streamvi.snapshots import SnapshotStore
from tests.integration import test_daemon, test_faults
from tests.integration.conftest import committed_offsets, produce_values, read_topic
from tests.integration.faultkit import read_all, read_committed_emulated
from tests.integration.scram_peer import ScramPeer
from tests.integration.test_security import KEY_PASSWORD, PASSWORD, secure_env, secure_overrides

pytestmark = pytest.mark.integration


@pytest.fixture
def rdkafka_settings(settings_factory):
    """The integration settings, on librdkafka."""

    def make(*overrides: str):
        return settings_factory("kafka.client=librdkafka", *overrides)

    return make


def wait_for_assignment(source: RdKafkaRecordSource, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not source.assignment():
        assert time.monotonic() < deadline, "no partition assigned"
        source.keepalive()
        time.sleep(0.05)


def poll_offsets(source: RdKafkaRecordSource, count: int, timeout: float = 20.0) -> list[tuple[int, int]]:
    """(partition, offset) of the next ``count`` records."""
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += [(r.partition, r.offset) for r in source.poll(0.5, count - len(got))]
    return got


# -- the daemon end to end -------------------------------------------------------------------------
def test_records_in_latents_out_then_resume(rdkafka_settings):
    test_daemon.test_records_in_latents_out_then_resume(rdkafka_settings)


def test_f32_input(rdkafka_settings):
    test_daemon.test_f32_input(rdkafka_settings)


def test_bad_input_is_dead_lettered_exactly_once(rdkafka_settings):
    test_faults.test_bad_input_is_dead_lettered_with_origin_and_the_rest_processed(rdkafka_settings)


def test_exactly_once_outputs_and_offsets_commit_in_one_transaction(rdkafka_settings):
    settings = rdkafka_settings("processing.guarantee=exactly_once", "snapshots.every_steps=3")
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    n = 200
    produce_values(bootstrap, kafka.input_topic, test_daemon.digits_records(0, n))
    daemon = build_daemon(settings, CollectorRegistry())
    assert isinstance(daemon.loop.source, RdKafkaRecordSource)
    assert isinstance(daemon.loop.sink, RdKafkaTransactionalSink)
    counts = daemon.run(max_records=n)
    assert counts.records_trained == n and counts.snapshots >= 2  # several transactions
    latents = read_committed_emulated(bootstrap, kafka.latents_topic, expected=n)
    assert sorted(orjson.loads(m.value)["offset"] for m in latents) == list(range(n))
    steps = read_committed_emulated(bootstrap, kafka.metrics_topic, expected=counts.steps)
    assert len(steps) == counts.steps
    assert committed_offsets(bootstrap, kafka.group_id) == {(kafka.input_topic, 0): n}
    snapshot = SnapshotStore(settings.snapshots.dir).latest()
    assert snapshot.offsets == {(kafka.input_topic, 0): n} and snapshot.meta["guarantee"] == "exactly_once"


@pytest.mark.parametrize(("guarantee", "kills", "seed"), [("exactly_once", 3, 5), ("at_least_once", 2, 11)])
def test_sigkill_at_random_moments_loses_nothing(rdkafka_settings, tmp_path, guarantee, kills, seed):
    test_faults.test_sigkill_at_random_moments_loses_nothing(
        rdkafka_settings, tmp_path, guarantee, kills, seed
    )
    # the daemon subprocesses (configured through STREAMVI_* variables) consumed with librdkafka
    logs = "".join(path.read_text(errors="replace") for path in tmp_path.glob("daemon-*.log"))
    assert "streamvi.io.rdkafka_source:" in logs and "streamvi.io.kafka_source:" not in logs


def test_broker_outage_readiness_and_nothing_lost(rdkafka_settings, broker):
    test_faults.test_broker_outage_readiness_and_nothing_lost(rdkafka_settings, broker)


def test_an_unreachable_broker_fails_the_start_naming_the_setting(rdkafka_settings):
    address = f"127.0.0.1:{free_port()}"
    settings = rdkafka_settings(
        f"kafka.bootstrap_servers={address}", "kafka.create_topics=false", "kafka.request_timeout_ms=2000"
    )
    started = time.monotonic()
    with pytest.raises(StreamVIError, match=f"kafka.bootstrap_servers={address}") as info:
        build_daemon(settings, CollectorRegistry())
    assert "_TRANSPORT" in str(info.value)
    assert time.monotonic() - started < 30


# -- the source on its own -------------------------------------------------------------------------
def test_start_offsets_keepalive_seek_commit_and_highwater(rdkafka_settings):
    kafka = rdkafka_settings().kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    produce_values(bootstrap, kafka.input_topic, [(f"k{i}".encode(), b"v%d" % i) for i in range(500)])
    source = RdKafkaRecordSource(kafka)
    assigned = []
    source.set_rebalance_callbacks(lambda partitions: assigned.append(source.assignment()), lambda p: None)
    source.set_start_offsets({(kafka.input_topic, 0): 100})
    try:
        wait_for_assignment(source)
        assert assigned == [[(kafka.input_topic, 0)]], "the hook sees the new assignment"
        source.keepalive()  # paused and resumed before the first record: nothing skipped
        first = source.poll(5.0, 10)
        assert [r.offset for r in first] == list(range(100, 110))
        assert (first[0].key, first[0].value, first[0].topic) == (b"k100", b"v100", kafka.input_topic)
        assert first[0].timestamp_ms > 0
        assert source.highwater((kafka.input_topic, 0)) == 500  # from the fetch, not end_offsets()
        assert source.connected()
        source.keepalive()
        assert poll_offsets(source, 5) == [(0, o) for o in range(110, 115)]
        source.commit({(kafka.input_topic, 0): 50})
        assert source.committed_offsets([(kafka.input_topic, 0)]) == {(kafka.input_topic, 0): 50}
        assert committed_offsets(bootstrap, kafka.group_id) == {(kafka.input_topic, 0): 50}
        source.seek({(kafka.input_topic, 0): 7})
        assert poll_offsets(source, 3) == [(0, 7), (0, 8), (0, 9)]
        source.seek({})  # unlisted: back to the group's committed offset
        assert poll_offsets(source, 3) == [(0, 50), (0, 51), (0, 52)]
        assert poll_offsets(source, 447) == [(0, o) for o in range(53, 500)]
        assert source.poll(0.5, 10) == []  # nothing more
        assert source.group_metadata() is not None
    finally:
        source.close()
    source.close()  # idempotent


def test_a_rebalance_revokes_then_assigns_at_committed_offsets(rdkafka_settings):
    kafka = rdkafka_settings("kafka.topic_partitions=2").kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(200):
        producer.produce(kafka.input_topic, b"v%d" % i, partition=i % 2)
    assert producer.flush(10) == 0
    producer.close()
    events: list[tuple[str, str, list]] = []

    def joined(name: str) -> RdKafkaRecordSource:
        source = RdKafkaRecordSource(kafka)

        def revoked(partitions):
            events.append((name, "revoked", sorted(partitions)))
            # the loop checkpoints here: committing inside the callback must work
            source.commit({p: 30 if p[1] == 0 else 60 for p in partitions})

        def assigned(partitions):
            events.append((name, "assigned", sorted(partitions)))

        source.set_rebalance_callbacks(assigned, revoked)
        return source

    first = joined("first")
    second = None
    try:
        wait_for_assignment(first)
        assert len(first.assignment()) == 2
        assert len(poll_offsets(first, 40)) == 40
        second = joined("second")
        deadline = time.monotonic() + 30
        while not (first.assignment() and second.assignment()) and time.monotonic() < deadline:
            first.keepalive()  # serves the rebalance without taking records
            second.keepalive()
            time.sleep(0.05)
        both = [(kafka.input_topic, 0), (kafka.input_topic, 1)]
        assert events[:2] == [("first", "assigned", both), ("first", "revoked", both)]
        assert len(first.assignment()) == len(second.assignment()) == 1
        # each partition resumes at what was committed in the revocation
        owner = {source.assignment()[0][1]: source for source in (first, second)}
        assert poll_offsets(owner[0], 1) == [(0, 30)]
        assert poll_offsets(owner[1], 1) == [(1, 60)]
    finally:
        for source in (second, first):
            if source is not None:
                source.set_rebalance_callbacks(lambda p: None, lambda p: None)
                source.close()


# -- the sinks on their own ------------------------------------------------------------------------
def test_sink_delivers_in_order_and_reports_a_failed_delivery(rdkafka_settings):
    kafka = rdkafka_settings().kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    sink = RdKafkaOutputSink(kafka)
    try:
        sink.send_many(
            [
                OutputMessage(kafka.latents_topic, b"k%d" % i, b"v%d" % i, [("h", b"%d" % i)])
                for i in range(300)
            ]
        )
        sink.send(OutputMessage(kafka.latents_topic, None, b"last"))
        sink.flush()
        messages = read_topic(bootstrap, kafka.latents_topic, 301)
        assert [m.value for m in messages] == [b"v%d" % i for i in range(300)] + [b"last"]
        assert messages[7].key == b"k7" and messages[7].headers == [("h", b"7")]
        sink.send(OutputMessage(kafka.latents_topic, None, b"x" * 2_000_000))  # over message.max.bytes
        with pytest.raises(StreamVIError, match="not delivered"):
            sink.flush()
        sink.flush()  # reported once; the sink goes on
    finally:
        sink.close()


def test_transactions_commit_abort_and_recover_from_fencing(rdkafka_settings):
    kafka = rdkafka_settings().kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": kafka.group_id})
    group = consumer.consumer_group_metadata()
    partition = (kafka.input_topic, 0)
    sink = RdKafkaTransactionalSink(kafka, f"tx-{kafka.group_id}", 60_000)
    try:
        sink.send(OutputMessage(kafka.latents_topic, None, b"committed-1"))
        sink.commit_transaction({partition: 10}, group)
        sink.send(OutputMessage(kafka.latents_topic, None, b"aborted"))
        sink.flush()  # durable on the broker, yet never visible to read_committed
        sink.abort_transaction()
        sink.send(OutputMessage(kafka.latents_topic, None, b"committed-2"))
        sink.commit_transaction({partition: 20}, group)
        assert committed_offsets(bootstrap, kafka.group_id) == {partition: 20}

        # a second instance with the same transactional id fences the first one; its send fails
        # first, and the commit after it names the fencing ...
        newer = RdKafkaTransactionalSink(kafka, f"tx-{kafka.group_id}", 60_000)
        sink.send(OutputMessage(kafka.latents_topic, None, b"zombie"))
        with pytest.raises(CommitError, match="fence"):
            sink.commit_transaction({partition: 30}, group)
        sink.abort_transaction()
        assert committed_offsets(bootstrap, kafka.group_id) == {partition: 20}
        newer.close()
        # ... and the first recovers with a new producer of its own, fencing the other in turn
        sink.send(OutputMessage(kafka.latents_topic, None, b"committed-3"))
        sink.commit_transaction({partition: 40}, group)
        assert committed_offsets(bootstrap, kafka.group_id) == {partition: 40}
    finally:
        sink.close()
        consumer.close()
    visible = [m.value for m in read_committed_emulated(bootstrap, kafka.latents_topic, expected=3)]
    assert visible == [b"committed-1", b"committed-2", b"committed-3"]
    everything = [m.value for m in read_all(bootstrap, kafka.latents_topic, expected=4)]
    assert b"aborted" in everything  # the broker keeps aborted records; consumers skip them


def test_sasl_ssl_settings_reach_librdkafka_and_secrets_stay_out_of_logs(caplog):
    caplog.set_level(logging.DEBUG)
    with ScramPeer({"streamvi-svc": PASSWORD}, "SCRAM-SHA-512") as peer:
        overrides = [*secure_overrides(peer.bootstrap, "SCRAM-SHA-512"), "kafka.client=librdkafka"]
        settings = load_settings(overrides=overrides, environ=secure_env())
        sink = RdKafkaOutputSink(settings.kafka)
        try:
            # metadata is served to an authenticated client only
            assert sink.producer.list_topics(timeout=10).cluster_id == "scram-peer"
        finally:
            sink.close()
        # the consumer's TLS material loads (the key is decrypted with ssl_password) at creation
        Consumer(rdkafka_config(settings.kafka, "consumer")).close()
    assert peer.sessions, "the producer connected"
    for session in peer.sessions[:1]:
        assert session.client_certificate_cn == "streamvi-client"
        assert session.client_id == settings.kafka.client_id
        assert session.mechanism == "SCRAM-SHA-512" and session.username == "streamvi-svc"
        assert session.authenticated, "the SCRAM proof matched the configured password"
    assert PASSWORD not in caplog.text and KEY_PASSWORD not in caplog.text
