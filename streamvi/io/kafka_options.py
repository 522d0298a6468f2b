"""kafka-python's vocabulary for the ``kafka`` settings: the options every kafka-python client of the
daemon (consumer, producers, admin) is created with."""

from __future__ import annotations

from typing import Any

from streamvi.config import KafkaSettings
from streamvi.io.kafka_core import security_settings

#: kafka-python's name of each security setting (see :func:`~streamvi.io.kafka_core.security_settings`).
_SECURITY_NAMES = {
    "sasl_mechanism": "sasl_mechanism",
    "sasl_username": "sasl_plain_username",
    "sasl_password": "sasl_plain_password",
    "ssl_check_hostname": "ssl_check_hostname",
    "ssl_cafile": "ssl_cafile",
    "ssl_certfile": "ssl_certfile",
    "ssl_keyfile": "ssl_keyfile",
    "ssl_password": "ssl_password",
}


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Options shared by every kafka-python client: address, identity and security.

    Holds the secrets in clear text, as the client needs them: pass it to the client, never log it.
    """
    options: dict[str, Any] = {
        "bootstrap_servers": list(settings.bootstrap_servers),
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
    }
    options.update({_SECURITY_NAMES[name]: value for name, value in security_settings(settings).items()})
    return options


def consumer_options(settings: KafkaSettings, isolation_level: str) -> dict[str, Any]:
    """A ``KafkaConsumer`` of the group: auto-commit off, a partition without a committed offset
    starting at its beginning."""
    return dict(
        client_options(settings),
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        max_poll_records=settings.max_poll_records,
        fetch_max_bytes=settings.fetch_max_bytes,
        max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        isolation_level=isolation_level,
    )


def producer_options(settings: KafkaSettings) -> dict[str, Any]:
    """The output ``KafkaProducer``: every ack awaited, in order (one request in flight)."""
    compression = None if settings.producer_compression == "none" else settings.producer_compression
    return dict(
        client_options(settings),
        acks="all",
        linger_ms=settings.producer_linger_ms,
        batch_size=settings.producer_batch_bytes,
        compression_type=compression,
        retries=5,
        max_in_flight_requests_per_connection=1,
    )


def transactional_producer_options(
    settings: KafkaSettings, transactional_id: str, transaction_timeout_ms: int
) -> dict[str, Any]:
    """The output producer of exactly-once processing: idempotent, retrying for as long as it takes."""
    return dict(
        producer_options(settings),
        transactional_id=transactional_id,
        transaction_timeout_ms=transaction_timeout_ms,
        enable_idempotence=True,
        retries=float("inf"),
    )
