"""Assembling an encoder replica from settings (``streamvi serve``): its Kafka clients in
``serving.group_id``, the snapshot watcher, /metrics, and the encoder loop once a trusted snapshot
is loaded. The stream path itself is streamvi/stream/encoder.py."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from confluent_kafka import KafkaException
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from streamvi.config import KafkaSettings, Settings
from streamvi.io.base import OutputSink, RecordSource
from streamvi.io.group_offsets import GroupOffsets
from streamvi.metrics import EncoderMetrics, Health, MetricsServer
from streamvi.runtime import (
    anomaly_monitor,
    build_decoder,
    build_trainer,
    frozen_heap,
    gil_switch_interval,
    kafka_clients,
    output_topics,
    processing_policy,
    startup_lines,
    versions,
    watch_broker,
)
from streamvi.snapshots.store import SnapshotStore
from streamvi.snapshots.trust import CommittedTrust, DurableTrust, SnapshotTrust
from streamvi.snapshots.watcher import LoadedModel, ReloadEvents, SnapshotWatcher
from streamvi.stream import CheckpointPolicy, EncoderLoop, LoopCounts

log = logging.getLogger(__name__)


def replica_kafka(settings: Settings) -> KafkaSettings:
    """The replica's Kafka settings: the trainer's, in the replicas' own consumer group."""
    return settings.kafka.model_copy(update={"group_id": settings.serving.group_id})


class _CountReloads(ReloadEvents):
    def __init__(self, metrics: EncoderMetrics) -> None:
        self.metrics = metrics

    def failed(self, path: object, reason: str, detail: str) -> None:
        self.metrics.snapshot_reload_failures.labels(reason=reason).inc()


@dataclass
class ReplicaDaemon:
    """A running replica's parts; ``run`` waits for a trusted snapshot, then encodes until stopped,
    and always closes its clients."""

    settings: Settings
    source: RecordSource
    sink: OutputSink
    watcher: SnapshotWatcher
    metrics: EncoderMetrics
    health: Health
    metrics_server: MetricsServer | None
    group_offsets: GroupOffsets | None = None
    loop: EncoderLoop | None = None
    _closed: threading.Event = field(default_factory=threading.Event)

    @property
    def metrics_url(self) -> str | None:
        return self.metrics_server.url if self.metrics_server else None

    def run(
        self,
        stop: threading.Event | None = None,
        max_records: int | None = None,
        idle_timeout_seconds: float | None = None,
    ) -> LoopCounts:
        stop = stop or threading.Event()
        try:
            with frozen_heap():
                model = self.watcher.wait_for_first(stop, self.health.beat)
                if model is None:
                    return LoopCounts()
                self.loop = self._loop(model)
                watch_broker(self.source, self.health, self._closed)
                with gil_switch_interval(self.settings.processing.gil_switch_interval_ms):
                    return self.loop.run(
                        stop, max_records=max_records, idle_timeout_seconds=idle_timeout_seconds
                    )
        finally:
            self.close()

    def _loop(self, model: LoadedModel) -> EncoderLoop:
        settings = self.settings
        return EncoderLoop(
            source=self.source,
            sink=self.sink,
            decoder=build_decoder(settings),
            watcher=self.watcher,
            model=model,
            topics=output_topics(settings),
            # a replica commits on time only (it takes no training steps)
            policy=CheckpointPolicy(
                every_steps=2**62, every_seconds=settings.serving.commit_interval_seconds
            ),
            max_batch_latency_seconds=settings.training.max_batch_latency_ms / 1000.0,
            metrics=self.metrics,
            health=self.health,
            max_poll_records=settings.kafka.max_poll_records,
            lag_interval_seconds=settings.metrics.lag_interval_seconds,
            processing=processing_policy(settings),
            pipeline_depth=settings.training.pipeline_depth,
        )

    def close(self) -> None:
        """Stop reloading, leave the group (hooks detached: the loop's final commit is done), flush
        and close the outputs, stop serving /metrics."""
        self._closed.set()
        self.watcher.stop()
        self.source.set_rebalance_callbacks(lambda partitions: None, lambda partitions: None)
        try:
            self.source.close()
        finally:
            try:
                self.sink.close()
            finally:
                if self.group_offsets is not None:
                    self.group_offsets.close()
                if self.metrics_server is not None:
                    self.metrics_server.stop()


def snapshot_trust(settings: Settings) -> tuple[SnapshotTrust, GroupOffsets | None]:
    """At-least-once: every durable snapshot; exactly-once: those whose transaction committed,
    judged by the trainer group's committed offsets."""
    if settings.processing.guarantee != "exactly_once":
        return DurableTrust(), None
    offsets = GroupOffsets(settings.kafka)
    return CommittedTrust(offsets.committed), offsets


def build_replica(settings: Settings, registry: CollectorRegistry | None = None) -> ReplicaDaemon:
    """Create topics if allowed, connect to Kafka in the replicas' group, start /metrics; the
    model is loaded when ``run`` starts (readiness stays 503 until then)."""
    from streamvi.io.admin import ensure_topics

    for line in startup_lines(settings, replica_kafka(settings)):
        log.info("%s", line)
    log.info(
        "role: encoder replica, snapshots from %s (%s)", settings.snapshots.dir, settings.processing.guarantee
    )
    registry = registry if registry is not None else CollectorRegistry()
    metrics = EncoderMetrics(registry)
    metrics.set_build_info(versions())
    health = Health(settings.metrics.liveness_timeout_seconds)
    server = None
    sink: OutputSink | None = None
    source: RecordSource | None = None
    group_offsets: GroupOffsets | None = None
    try:
        if settings.metrics.enabled:
            server = MetricsServer(registry, health, settings.metrics.host, settings.metrics.port).start()
        if settings.kafka.create_topics:
            ensure_topics(settings.kafka)
        trust, group_offsets = snapshot_trust(settings)
        watcher = SnapshotWatcher(
            SnapshotStore(settings.snapshots.dir, keep=settings.snapshots.keep),
            trust,
            lambda: build_trainer(settings),
            settings.public_dict(),
            settings.serving.reload_interval_seconds,
            _CountReloads(metrics),
            lambda: anomaly_monitor(settings, learns=False),
        )
        sink, source = kafka_clients(
            settings, replica_kafka(settings), settings.serving.transactional_id_for_this_process()
        )
    except BaseException as exc:
        for client in (source, sink, group_offsets):
            if client is not None:
                try:
                    client.close()
                except Exception:  # already failing; the original error is what matters
                    log.debug("closing a client after a failed start", exc_info=True)
        if server is not None:
            server.stop()
        if isinstance(exc, KafkaError | KafkaException):
            raise settings.kafka.failure(exc) from exc
        raise
    return ReplicaDaemon(settings, source, sink, watcher, metrics, health, server, group_offsets)
