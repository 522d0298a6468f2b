"""Each client library's names for the ``kafka`` settings: librdkafka's (streamvi.io.rdkafka_options)
and kafka-python's (streamvi.io.kafka_options; its secrets are checked in tests/unit/test_config.py)."""

from __future__ import annotations

import pytest

from streamvi.config import Settings, load_settings
from streamvi.io.kafka_options import consumer_options, producer_options, transactional_producer_options
from streamvi.io.rdkafka_options import rdkafka_config, transactional_config


def _secure(*extra: str) -> Settings:
    return load_settings(
        overrides=[
            "kafka.client=librdkafka",
            "kafka.bootstrap_servers=a:9093,b:9093",
            "kafka.security_protocol=SASL_SSL",
            "kafka.sasl_mechanism=SCRAM-SHA-256",
            "kafka.sasl_username=svc",
            "kafka.ssl_cafile=/etc/tls/ca.pem",
            "kafka.ssl_certfile=/etc/tls/client.pem",
            "kafka.ssl_keyfile=/etc/tls/client.key",
            *extra,
        ],
        environ={"STREAMVI_KAFKA__SASL_PASSWORD": "hunter2", "STREAMVI_KAFKA__SSL_PASSWORD": "keypass"},
    )


def test_rdkafka_config_maps_address_identity_and_security():
    settings = _secure()
    assert settings.kafka.client == "librdkafka"
    for role in ("consumer", "producer"):
        config = rdkafka_config(settings.kafka, role)
        assert config["bootstrap.servers"] == "a:9093,b:9093"
        assert config["client.id"] == "streamvi"
        assert config["security.protocol"] == "SASL_SSL"
        assert config["sasl.mechanism"] == "SCRAM-SHA-256"
        assert config["sasl.username"] == "svc"
        assert config["sasl.password"] == "hunter2"  # the client needs it in clear text ...
        assert config["ssl.key.password"] == "keypass"
        assert config["ssl.ca.location"] == "/etc/tls/ca.pem"
        assert config["ssl.certificate.location"] == "/etc/tls/client.pem"
        assert config["ssl.key.location"] == "/etc/tls/client.key"
        assert config["ssl.endpoint.identification.algorithm"] == "https"
        assert config["socket.timeout.ms"] == settings.kafka.request_timeout_ms
    # ... and nowhere else: not in the settings' repr or their public form
    shown = repr(settings) + str(settings.public_dict())
    assert "hunter2" not in shown and "keypass" not in shown
    unchecked = rdkafka_config(_secure("kafka.ssl_check_hostname=false").kafka, "producer")
    assert unchecked["ssl.endpoint.identification.algorithm"] == "none"


def test_rdkafka_config_without_tls_or_sasl_sets_neither():
    config = rdkafka_config(load_settings(environ={}).kafka, "consumer")
    assert config["security.protocol"] == "PLAINTEXT"
    assert not [key for key in config if key.startswith(("ssl.", "sasl."))]


def test_rdkafka_consumer_and_producer_roles():
    settings = load_settings(
        overrides=[
            "kafka.group_id=g1",
            "kafka.session_timeout_ms=6000",
            "kafka.heartbeat_interval_ms=1500",
            "kafka.max_poll_interval_ms=120000",
            "kafka.fetch_max_wait_ms=40",
            "kafka.fetch_max_bytes=2000000",
            "kafka.max_partition_fetch_bytes=1048576",
            "kafka.producer_linger_ms=7",
            "kafka.producer_batch_bytes=65536",
            "kafka.producer_compression=gzip",
            "kafka.request_timeout_ms=15000",
        ],
        environ={},
    ).kafka
    consumer = rdkafka_config(settings, "consumer", isolation_level="read_committed")
    assert consumer["group.id"] == "g1"
    assert (consumer["session.timeout.ms"], consumer["heartbeat.interval.ms"]) == (6000, 1500)
    assert consumer["max.poll.interval.ms"] == 120000
    assert consumer["fetch.wait.max.ms"] == 40
    # a full local queue postpones fetching 10 ms, not librdkafka's 1 s (a stall per queue-full)
    assert consumer["fetch.queue.backoff.ms"] == 10
    assert (consumer["fetch.max.bytes"], consumer["max.partition.fetch.bytes"]) == (2_000_000, 1_048_576)
    assert consumer["enable.auto.commit"] is False and consumer["enable.auto.offset.store"] is False
    assert consumer["auto.offset.reset"] == "earliest"
    assert consumer["isolation.level"] == "read_committed"
    assert rdkafka_config(settings, "consumer")["isolation.level"] == "read_uncommitted"
    assert not {"acks", "linger.ms", "request.timeout.ms"} & set(consumer)
    producer = rdkafka_config(settings, "producer")
    assert producer["acks"] == "all" and producer["enable.idempotence"] is True
    assert (producer["linger.ms"], producer["batch.size"]) == (7, 65536)
    assert producer["compression.type"] == "gzip"
    assert producer["request.timeout.ms"] == producer["socket.timeout.ms"] == 15000
    assert not {"group.id", "session.timeout.ms", "isolation.level"} & set(producer)


@pytest.mark.parametrize("fetch_max_bytes", [1024, 52_428_800, 200_000_000])
def test_librdkafka_accepts_the_mapped_configuration(fetch_max_bytes):
    """librdkafka checks its properties (names, ranges, consistency) when a client is created."""
    from confluent_kafka import Consumer, Producer

    settings = load_settings(
        overrides=["kafka.bootstrap_servers=127.0.0.1:9", f"kafka.fetch_max_bytes={fetch_max_bytes}"],
        environ={},
    ).kafka
    Consumer(rdkafka_config(settings, "consumer")).close()
    Producer(rdkafka_config(settings, "producer")).close()


def test_rdkafka_transactional_producer_bounds_its_requests_by_the_transaction():
    settings = load_settings(overrides=["kafka.request_timeout_ms=30000"], environ={}).kafka
    assert transactional_config(settings, "tx", 20_000) == {
        "transactional.id": "tx",
        "transaction.timeout.ms": 20_000,
        "socket.timeout.ms": 20_000,
    }
    assert transactional_config(settings, "tx", 60_000)["socket.timeout.ms"] == 30_000


def test_kafka_python_consumer_and_producer_options():
    settings = load_settings(
        overrides=[
            "kafka.group_id=g1",
            "kafka.session_timeout_ms=6000",
            "kafka.heartbeat_interval_ms=1500",
            "kafka.max_poll_records=77",
            "kafka.fetch_max_wait_ms=40",
            "kafka.producer_linger_ms=7",
            "kafka.producer_batch_bytes=65536",
            "kafka.producer_compression=gzip",
        ],
        environ={},
    ).kafka
    consumer = consumer_options(settings, "read_committed")
    assert consumer["bootstrap_servers"] == ["localhost:9092"] and consumer["group_id"] == "g1"
    assert consumer["enable_auto_commit"] is False and consumer["auto_offset_reset"] == "earliest"
    assert (consumer["session_timeout_ms"], consumer["heartbeat_interval_ms"]) == (6000, 1500)
    assert (consumer["max_poll_records"], consumer["fetch_max_wait_ms"]) == (77, 40)
    assert consumer["isolation_level"] == "read_committed"
    producer = producer_options(settings)
    assert producer["acks"] == "all" and producer["max_in_flight_requests_per_connection"] == 1
    assert (producer["linger_ms"], producer["batch_size"], producer["compression_type"]) == (7, 65536, "gzip")
    assert producer["retries"] == 5 and "transactional_id" not in producer
    assert producer_options(load_settings(environ={}).kafka)["compression_type"] is None
    transactional = transactional_producer_options(settings, "tx", 20_000)
    assert (transactional["transactional_id"], transactional["transaction_timeout_ms"]) == ("tx", 20_000)
    assert transactional["enable_idempotence"] is True and transactional["retries"] == float("inf")
    assert {k: v for k, v in transactional.items() if k in producer and k != "retries"} == {
        k: v for k, v in producer.items() if k != "retries"
    }
