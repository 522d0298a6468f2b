"""Wire formats proven with an independent client: librdkafka (the confluent-kafka wheel) produces
the input and reads latents, dead letters and metrics back; the daemon uses kafka-python."""

from __future__ import annotations

import math
import time

import numpy as np
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from streamvi.datasets import load_digits
from streamvi.io.admin import ensure_topics
from streamvi.io.codecs import HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_TOPIC
from streamvi.runtime import build_daemon

pytestmark = pytest.mark.integration

GOOD = 150


def produce_with_librdkafka(bootstrap: str, topic: str, items) -> dict[bytes, tuple[int, int]]:
    """Send (key, value, headers) items; return each key's (partition, offset) as librdkafka reports it."""
    delivered: dict[bytes, tuple[int, int]] = {}
    errors = []

    def report(error, message):
        if error is not None:
            errors.append(error)
        else:
            delivered[message.key()] = (message.partition(), message.offset())

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": False})
    for key, value, headers in items:
        producer.produce(topic, key=key, value=value, headers=headers, on_delivery=report)
    assert producer.flush(30) == 0
    assert not errors, errors
    return delivered


def read_with_librdkafka(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"interop-{topic}", "enable.auto.commit": False}
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(partitions)])
        messages = []
        deadline = time.monotonic() + timeout
        while len(messages) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            messages.append(message)
        return messages
    finally:
        consumer.close()


@pytest.mark.parametrize("fmt", ["json", "f32"])
def test_librdkafka_in_latents_out(settings_factory, fmt):
    settings = settings_factory(f"input.format={fmt}", "kafka.topic_partitions=2")
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    data = load_digits()
    items = []
    for i in range(GOOD):
        x = data.x[i]
        if fmt == "json":
            value = orjson.dumps({"id": f"doc-{i}", "x": x.tolist(), "label": int(data.labels[i])})
        else:
            value = x.astype("<f4").tobytes()
        items.append((f"key-{i}".encode(), value, [("source", b"librdkafka")]))
    bad_value = b"\x00\x01 definitely not a record"
    items.insert(70, (b"bad-1", bad_value, [("trace-id", b"abc123")]))
    delivered = produce_with_librdkafka(bootstrap, kafka.input_topic, items)
    assert len(delivered) == GOOD + 1
    assert {partition for partition, _ in delivered.values()} == {0, 1}, "keys spread over partitions"

    daemon = build_daemon(settings, CollectorRegistry())
    counts = daemon.run(max_records=GOOD + 1)
    assert counts.records_trained == GOOD and counts.dead_letters == 1

    latents = read_with_librdkafka(bootstrap, kafka.latents_topic, GOOD)
    assert len(latents) == GOOD
    seen = set()
    for message in latents:
        key = message.key()
        body = orjson.loads(message.value())
        assert (body["partition"], body["offset"]) == delivered[key], "source position as librdkafka saw it"
        assert body["topic"] == kafka.input_topic
        index = int(key.decode().split("-")[1])
        assert body["id"] == (f"doc-{index}" if fmt == "json" else key.decode())
        assert len(body["z_mean"]) == len(body["z_scale"]) == settings.model.latent_dim
        assert all(s > 0 for s in body["z_scale"]) and math.isfinite(body["elbo"])
        assert body["model_step"] >= 0 and body["bound"] == "elbo"
        seen.add(key)
    assert len(seen) == GOOD

    (dead,) = read_with_librdkafka(bootstrap, kafka.dead_letter_topic, 1)
    headers = dict(dead.headers())
    assert dead.key() == b"bad-1" and dead.value() == bad_value
    assert headers["trace-id"] == b"abc123", "original headers are kept"
    assert headers[HEADER_REASON] in (b"invalid_json", b"wrong_length")
    assert headers[HEADER_TOPIC] == kafka.input_topic.encode()
    assert (int(headers[HEADER_PARTITION]), int(headers[HEADER_OFFSET])) == delivered[b"bad-1"]

    steps = read_with_librdkafka(bootstrap, kafka.metrics_topic, counts.steps)
    bodies = sorted((orjson.loads(m.value()) for m in steps), key=lambda b: b["step"])
    assert [b["step"] for b in bodies] == list(range(1, counts.steps + 1))
    assert sum(b["records"] for b in bodies) == GOOD
    assert all(np.isfinite([b["elbo"], b["kl"], b["reconstruction"]]).all() for b in bodies)
