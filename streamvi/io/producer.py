"""Feeding a dataset into a topic, at full speed or at a fixed rate."""

from __future__ import annotations

import time
from collections.abc import Callable

from kafka import KafkaProducer

from streamvi.config import KafkaSettings
from streamvi.datasets import Dataset, encode_record
from streamvi.errors import OutputError
from streamvi.io.kafka_options import client_options


def produce_dataset(
    settings: KafkaSettings,
    dataset: Dataset,
    topic: str,
    fmt: str,
    repeat: int = 1,
    limit: int | None = None,
    rate: float | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Send the dataset ``repeat`` times (at most ``limit`` records), keyed by record id; return the count."""
    producer = KafkaProducer(**client_options(settings), acks="all", linger_ms=20, batch_size=262_144)
    failures: list[BaseException] = []
    total = len(dataset) * repeat if limit is None else min(limit, len(dataset) * repeat)
    started = time.monotonic()
    sent = 0
    try:
        for sent in range(total):
            index = sent % len(dataset)
            record_id = (
                dataset.ids[index] if repeat == 1 else f"{dataset.ids[index]}-pass{sent // len(dataset)}"
            )
            label = None if dataset.labels is None else int(dataset.labels[index])
            context = None if dataset.context is None else dataset.context[index]
            value = encode_record(dataset.x[index], record_id, fmt, label, context)
            producer.send(topic, key=record_id.encode(), value=value).add_errback(failures.append)
            if rate:
                delay = started + (sent + 1) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if on_progress is not None:
                on_progress(1)
        producer.flush()
    finally:
        producer.close()
    if failures:
        raise OutputError(f"{len(failures)} records were not delivered to {topic}: {failures[0]}")
    return total
