"""Topic administration: create the topics the daemon reads and writes when they are missing."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from streamvi.config import KafkaSettings
from streamvi.io.kafka_options import client_options

log = logging.getLogger(__name__)


def ensure_topics(settings: KafkaSettings, topics: Iterable[str] | None = None) -> list[str]:
    """Create each missing topic with the configured partitions and replication; return those created."""
    wanted = list(
        topics
        if topics is not None
        else (
            settings.input_topic,
            settings.latents_topic,
            settings.metrics_topic,
            settings.dead_letter_topic,
            settings.anomalies_topic,
        )
    )
    admin = KafkaAdminClient(**client_options(settings))
    try:
        existing = set(admin.list_topics())
        missing = [topic for topic in wanted if topic not in existing]
        created = []
        for topic in missing:
            try:
                admin.create_topics(
                    [NewTopic(topic, settings.topic_partitions, settings.topic_replication_factor)]
                )
                created.append(topic)
                log.info("created topic %s", topic)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()
