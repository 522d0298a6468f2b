"""Integration fixtures: one embedded broker per session, a fresh set of topics and a group per test."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

from streamvi.config import Settings, load_settings
from streamvi.io.embedded import EmbeddedBroker

_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log_file = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_file=log_file) as running:
        yield running


TRAIN_ON_FLAGGED = "anomaly.train_on_flagged=true"


@pytest.fixture
def settings_factory(broker: EmbeddedBroker, tmp_path: Path):
    """Settings on the session broker with topics and a consumer group nobody else uses."""
    suffix = f"{next(_counter)}-{uuid.uuid4().hex[:6]}"

    def make(*overrides: str) -> Settings:
        return load_settings(
            overrides=[
                f"kafka.bootstrap_servers={broker.bootstrap_servers}",
                f"kafka.input_topic=in-{suffix}",
                f"kafka.latents_topic=latents-{suffix}",
                f"kafka.metrics_topic=metrics-{suffix}",
                f"kafka.dead_letter_topic=dlq-{suffix}",
                f"kafka.anomalies_topic=anomalies-{suffix}",
                f"kafka.group_id=group-{suffix}",
                f"serving.group_id=encoders-{suffix}",
                "kafka.session_timeout_ms=6000",
                "kafka.heartbeat_interval_ms=1000",
                f"snapshots.dir={tmp_path / 'snapshots'}",
                "snapshots.every_steps=10",
                "metrics.port=0",
                # z's size, for the latent family that has one (a setting that cannot apply is refused)
                *([] if "model.latent=gumbel_softmax" in overrides else ["model.latent_dim=4"]),
                "model.encoder_hidden=[64, 32]",
                "training.batch_size=32",
                "training.learning_rate=0.005",
                "training.max_batch_latency_ms=100",
                "evaluation.heldout_fraction=0",  # exact record counts; held-out tests turn it on
                # every record trained on (exact counts); the anomaly tests leave flagged ones out
                *([] if any(o.startswith("anomaly.") for o in overrides) else [TRAIN_ON_FLAGGED]),
                *overrides,
            ],
            environ={},
        )

    return make


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list:
    """Every message of ``topic`` (all partitions) from the start, waiting until ``expected`` are there."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000)
    try:
        deadline = time.monotonic() + timeout
        partitions = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                time.sleep(0.2)
        if partitions is None:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        messages: list = []
        while len(messages) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                messages.extend(batch)
        # anything beyond the expected count would be a duplicate: give it a moment to show up
        for batch in consumer.poll(timeout_ms=500).values():
            messages.extend(batch)
        return messages
    finally:
        consumer.close()


def produce_values(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=262_144)
    try:
        for key, value in items:
            producer.send(topic, key=key, value=value)
        producer.flush()
    finally:
        producer.close()


def committed_offsets(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets(group)[group]
    finally:
        admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}
