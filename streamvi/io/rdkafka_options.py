"""librdkafka's vocabulary for the ``kafka`` settings: the properties of the daemon's confluent-kafka
``Consumer`` and ``Producer``. Combinations librdkafka refuses are rejected at load, in
:mod:`streamvi.config` (``kafka.client=librdkafka``)."""

from __future__ import annotations

from typing import Any, Literal

from streamvi.config import KafkaSettings
from streamvi.io.kafka_core import security_settings

#: librdkafka's name of each security setting (see :func:`~streamvi.io.kafka_core.security_settings`).
_SECURITY_NAMES = {
    "sasl_mechanism": "sasl.mechanism",
    "sasl_username": "sasl.username",
    "sasl_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
}


def rdkafka_config(
    settings: KafkaSettings,
    role: Literal["consumer", "producer"],
    isolation_level: str = "read_uncommitted",
) -> dict[str, Any]:
    """The settings as librdkafka properties, for a confluent-kafka ``Consumer`` or ``Producer``.

    Holds the secrets in clear text, as the client needs them: pass it to the client, never log it.
    The consumer commits only what it is told to (no auto commit, no auto offset store) and
    starts a partition without a committed offset at its beginning, like the kafka-python one.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": ",".join(settings.bootstrap_servers),
        "client.id": settings.client_id,
        "security.protocol": settings.security_protocol,
        "socket.timeout.ms": settings.request_timeout_ms,
    }
    security = security_settings(settings)
    check_hostname = security.pop("ssl_check_hostname", None)
    if check_hostname is not None:
        config["ssl.endpoint.identification.algorithm"] = "https" if check_hostname else "none"
    config.update({_SECURITY_NAMES[name]: value for name, value in security.items()})
    config.update(_consumer(settings, isolation_level) if role == "consumer" else _producer(settings))
    return config


#: How long librdkafka waits to fetch again once its local queue is full (see ``_consumer``).
_FETCH_QUEUE_BACKOFF_MS = 10


def _consumer(settings: KafkaSettings, isolation_level: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "group.id": settings.group_id,
        # eager rebalancing, and assignors kafka-python members of the same group share
        "partition.assignment.strategy": "range,roundrobin",
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": settings.heartbeat_interval_ms,
        "max.poll.interval.ms": settings.max_poll_interval_ms,
        "fetch.wait.max.ms": settings.fetch_max_wait_ms,
        "fetch.max.bytes": settings.fetch_max_bytes,
        "max.partition.fetch.bytes": settings.max_partition_fetch_bytes,
        # a response must fit the receive buffer (librdkafka refuses a smaller one)
        "receive.message.max.bytes": max(100_000_000, settings.fetch_max_bytes + 512),
        # Once its local queue passes queued.max.messages.kbytes (64 MiB: ~20,000 MNIST-sized
        # records, which a backlog fills at once), librdkafka postpones the next fetch by this
        # much; at its default of 1 s the daemon drained the queue and then waited ~0.4 s for more,
        # holding one consumer to 38,000-47,000 f32 records/s here, 87,000-92,000/s at 10 ms.
        "fetch.queue.backoff.ms": _FETCH_QUEUE_BACKOFF_MS,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": isolation_level,
    }
    if settings.fetch_max_bytes < 1_000_000:
        # librdkafka wants fetch.max.bytes >= message.max.bytes, which only bounds the size
        # of the (small) requests a consumer sends
        config["message.max.bytes"] = settings.fetch_max_bytes
    return config


def _producer(settings: KafkaSettings) -> dict[str, Any]:
    return {
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": settings.producer_linger_ms,
        "batch.size": settings.producer_batch_bytes,
        "compression.type": settings.producer_compression,
        "request.timeout.ms": settings.request_timeout_ms,
    }


def transactional_config(
    settings: KafkaSettings, transactional_id: str, transaction_timeout_ms: int
) -> dict[str, Any]:
    """What a transactional producer adds to ``rdkafka_config(settings, "producer")``."""
    return {
        "transactional.id": transactional_id,
        "transaction.timeout.ms": transaction_timeout_ms,
        # librdkafka refuses a request timeout longer than the transaction it belongs to
        "socket.timeout.ms": min(settings.request_timeout_ms, transaction_timeout_ms),
    }
