"""Assembling the pieces from settings: the trainer, and the daemon (Kafka source, sink, metrics, loop)."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from confluent_kafka import KafkaException
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from streamvi import __version__
from streamvi.anomaly.monitor import AnomalyMonitor
from streamvi.cluster import progress_file, start_cluster
from streamvi.config import KafkaSettings, Settings
from streamvi.estimators import build_estimator
from streamvi.features.decoder import FeatureDecoder
from streamvi.io.base import OutputSink, RecordSource
from streamvi.io.codecs import RecordDecoder, Support
from streamvi.io.kafka_core import Backoff
from streamvi.io.kafka_sink import KafkaOutputSink, KafkaTransactionalSink
from streamvi.io.kafka_source import KafkaRecordSource
from streamvi.io.rdkafka_sink import RdKafkaOutputSink, RdKafkaTransactionalSink
from streamvi.io.rdkafka_source import RdKafkaRecordSource
from streamvi.metrics import Health, Metrics, MetricsServer
from streamvi.model.vae import build_vae
from streamvi.snapshots.store import SnapshotInfo, SnapshotLock, SnapshotStore
from streamvi.stream import (
    CheckpointPolicy,
    EvaluationPolicy,
    LoopCounts,
    OnlineLoop,
    OutputTopics,
    ProcessingPolicy,
    TrainingShare,
)
from streamvi.training.distributed import build_distributed_trainer
from streamvi.training.heldout import HeldOutReservoir
from streamvi.training.trainer import Trainer

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Versions of streamvi and the libraries whose behaviour a snapshot depends on."""
    found = {"streamvi": __version__}
    for package in ("tensorflow", "tensorflow-probability", "tf-keras", "kafka-python", "confluent-kafka"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


def build_trainer(settings: Settings) -> Trainer:
    """Model, estimator and optimizer as configured, ready to train or to restore into."""
    model = build_vae(
        settings.model, settings.training, settings.input.dim, settings.input.context_dim, settings.input
    )
    return Trainer.from_settings(
        model, build_estimator(settings), settings.training, explain_top_k=settings.anomaly.explain_top_k
    )


def build_decoder(settings: Settings) -> RecordDecoder | FeatureDecoder:
    """The input decoder: model-ready vectors, or events under the feature schema ``input.features``."""
    inputs = settings.input
    if inputs.features is not None:
        return FeatureDecoder(
            inputs.features,
            inputs.format,
            inputs.max_record_bytes,
            inputs.avro_schema,
            inputs.avro_schema_ids,
        )
    return RecordDecoder(
        inputs.format,
        inputs.dim,
        inputs.max_record_bytes,
        inputs.context_dim,
        support=Support.of_likelihood(settings.model.likelihood, settings.model.binomial_total_count),
    )


def evaluation_policy(settings: Settings) -> EvaluationPolicy | None:
    """The held-out evaluation the settings ask for; None when no record is held out."""
    evaluation = settings.evaluation
    if evaluation.heldout_fraction <= 0.0:
        return None
    reservoir = HeldOutReservoir(
        evaluation.heldout_fraction,
        evaluation.heldout_capacity,
        settings.input.dim,
        settings.input.context_dim,
    )
    return EvaluationPolicy(
        reservoir, evaluation.every_steps, evaluation.importance_samples, settings.snapshots.sample_records
    )


def anomaly_monitor(settings: Settings, learns: bool = True) -> AnomalyMonitor | None:
    """Percentiles, flags and drift detection as ``anomaly`` configures them; None when off."""
    return AnomalyMonitor(settings.anomaly, learns=learns) if settings.anomaly.enabled else None


def snapshot_meta(settings: Settings) -> dict[str, Any]:
    """The static part of every snapshot's meta.json: config (secrets masked) and versions."""
    return {"config": settings.public_dict(), "versions": versions()}


def processing_policy(settings: Settings) -> ProcessingPolicy:
    processing = settings.processing
    return ProcessingPolicy(
        exactly_once=processing.guarantee == "exactly_once",
        max_nonfinite_in_a_row=processing.max_nonfinite_in_a_row,
        keepalive_seconds=processing.keepalive_seconds,
        retry_initial_seconds=processing.retry_initial_seconds,
        retry_max_seconds=processing.retry_max_seconds,
    )


def output_topics(settings: Settings, per_record: bool = True) -> OutputTopics:
    """The topics a role publishes to; ``per_record=False``: metrics only, for a trainer whose
    latents and dead letters encoder replicas publish (``training.publish_latents=false``)."""
    kafka = settings.kafka
    return OutputTopics(
        latents=kafka.latents_topic if per_record else None,
        metrics=kafka.metrics_topic,
        dead_letter=kafka.dead_letter_topic if per_record else None,
        anomalies=kafka.anomalies_topic if per_record and settings.anomaly.enabled else None,
    )


@dataclass
class Daemon:
    """A running daemon's parts; ``run`` blocks until stopped and always closes its clients."""

    settings: Settings
    loop: OnlineLoop
    metrics_server: MetricsServer | None
    restored: SnapshotInfo | None
    lock: SnapshotLock | None = None
    _watcher: threading.Thread | None = None
    _closed: threading.Event | None = None

    @property
    def metrics_url(self) -> str | None:
        return self.metrics_server.url if self.metrics_server else None

    def run(
        self,
        stop: threading.Event | None = None,
        max_records: int | None = None,
        idle_timeout_seconds: float | None = None,
    ) -> LoopCounts:
        self._watch_broker()
        try:
            with gil_switch_interval(self.settings.processing.gil_switch_interval_ms):
                return self.loop.run(stop, max_records=max_records, idle_timeout_seconds=idle_timeout_seconds)
        finally:
            self.close()

    def _watch_broker(self) -> None:
        self._closed = threading.Event()
        self._watcher = watch_broker(self.loop.source, self.loop.health, self._closed)

    def close(self) -> None:
        """Leave the group, then flush and close the outputs, then stop serving and unlock.

        The loop has already written its final checkpoint; the revocation that leaving the group
        triggers must not start another one, so the rebalance hooks are detached first.
        """
        if self._closed is not None:
            self._closed.set()
        source = self.loop.source
        source.set_rebalance_callbacks(lambda partitions: None, lambda partitions: None)
        try:
            source.close()
        finally:
            try:
                self.loop.sink.close()
            finally:
                if self.metrics_server is not None:
                    self.metrics_server.stop()
                if self.lock is not None:
                    self.lock.release()


def watch_broker(
    source: RecordSource, health: Health, closed: threading.Event, interval_seconds: float = 0.5
) -> threading.Thread:
    """/readyz follows broker connectivity, even while the loop is blocked waiting for it; the
    thread ends once ``closed`` is set."""

    def watch() -> None:
        was: bool | None = None  # silent until the first answer (joining takes a moment)
        while not closed.wait(interval_seconds):
            now = source.connected()
            if was is None and not now:
                continue
            if was is not None and now != was:
                (log.info if now else log.warning)(
                    "broker %s", "reachable again" if now else "unreachable: not ready"
                )
            was = now
            health.set(broker_connected=now)

    thread = threading.Thread(target=watch, name="streamvi-broker-watch", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def gil_switch_interval(milliseconds: float) -> Iterator[None]:
    """``processing.gil_switch_interval_ms`` for the daemon's run (see its docstring)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(milliseconds / 1000.0)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects alive at start (the imported libraries, TensorFlow's above all: ~500k of
    them) out of the collector's full passes while the stream runs: each full pass otherwise walks
    them all, a ~0.3 s pause of every thread; objects created later (a reloaded model) stay collectable."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def record_source(kafka: KafkaSettings, isolation_level: str = "read_uncommitted") -> RecordSource:
    """The record source on the client library ``kafka.client`` names, subscribed to the input topic."""
    if kafka.client == "librdkafka":
        return RdKafkaRecordSource(kafka, isolation_level)
    return KafkaRecordSource(kafka, isolation_level)


def kafka_clients(
    settings: Settings, kafka: KafkaSettings | None = None, transactional_id: str | None = None
) -> tuple[OutputSink, RecordSource]:
    """The daemon's output sink and record source, on the client library ``kafka.client`` names
    (``kafka``: other Kafka settings than ``settings.kafka``, e.g. an encoder replica's group).

    The sink comes first: under exactly-once its ``init_transactions`` fences an earlier instance
    before this one starts consuming.
    """
    kafka = kafka if kafka is not None else settings.kafka
    processing = settings.processing
    exactly_once = processing.guarantee == "exactly_once"
    plain: type[KafkaOutputSink] | type[RdKafkaOutputSink]
    transactional: type[KafkaTransactionalSink] | type[RdKafkaTransactionalSink]
    if kafka.client == "librdkafka":
        plain, transactional = RdKafkaOutputSink, RdKafkaTransactionalSink
    else:
        plain, transactional = KafkaOutputSink, KafkaTransactionalSink
    sink: OutputSink
    if exactly_once:
        transactional_id = transactional_id or processing.transactional_id_for(kafka.group_id)
        backoff = Backoff(processing.retry_initial_seconds, processing.retry_max_seconds)
        sink = transactional(kafka, transactional_id, processing.transaction_timeout_ms, backoff)
    else:
        sink = plain(kafka)
    try:
        source = record_source(kafka, "read_committed" if exactly_once else "read_uncommitted")
    except BaseException:
        try:
            sink.close()
        except Exception:  # already failing; the original error is what matters
            log.debug("closing the sink after a failed start", exc_info=True)
        raise
    return sink, source


def describe_device(device: str | None) -> str:
    """Where the training step runs: ``training.device``, else TensorFlow's choice (its first GPU)."""
    import tensorflow as tf

    gpus = [gpu.name.removeprefix("/physical_device:") for gpu in tf.config.list_physical_devices("GPU")]
    visible = f"GPUs visible: {', '.join(gpus)}" if gpus else "no GPU visible to TensorFlow"
    if device:
        return f"{device} (training.device; {visible})"
    return f"/GPU:0 ({visible})" if gpus else f"CPU ({visible})"


def startup_lines(settings: Settings, kafka: KafkaSettings | None = None) -> list[str]:
    """What a daemon is about to do, for the first lines of its log: broker, topics, model, device
    (``kafka``: the role's Kafka settings when they are not ``settings.kafka``, e.g. a replica's group)."""
    kafka = kafka if kafka is not None else settings.kafka
    model, training = settings.model, settings.training
    latent = (
        f"gaussian z of {model.latent_dim}"
        if model.latent == "gaussian"
        else f"gumbel_softmax z of {model.categorical_variables} x {model.categories} classes"
    )
    context = f" + {settings.input.context_dim} context" if settings.input.context_dim else ""
    outputs = (
        f"latents {kafka.latents_topic}, metrics {kafka.metrics_topic}, "
        f"dead letters {kafka.dead_letter_topic}"
        if training.publish_latents
        else f"metrics {kafka.metrics_topic} (latents and dead letters: the encoder replicas')"
    )
    return [
        f"streamvi {__version__}: broker {','.join(kafka.bootstrap_servers)} ({kafka.client}, "
        f"{kafka.security_protocol}), consumer group {kafka.group_id}, {settings.processing.guarantee}",
        f"topics: input {kafka.input_topic} ({settings.input.format}, {settings.input.dim} values{context}), "
        + outputs,
        f"model: {latent}, encoder {model.encoder_hidden}, decoder {model.decoder_widths}, "
        f"{model.likelihood} likelihood; estimator {training.estimator}, batch {training.batch_size}, "
        f"{training.optimizer} lr {training.learning_rate}",
        f"device: {describe_device(training.device)}",
        anomaly_line(settings, kafka),
    ]


def anomaly_line(settings: Settings, kafka: KafkaSettings) -> str:
    """The start-up line on anomaly flags and drift."""
    anomaly = settings.anomaly
    if not anomaly.enabled:
        return "anomalies: off (anomaly.enabled=false)"
    trained = "trained on" if anomaly.train_on_flagged else "not trained on"
    drift = (
        "no drift detection"
        if anomaly.drift_detector == "none"
        else f"drift by {anomaly.drift_detector}, response {anomaly.drift_response}"
    )
    where = f" to {kafka.anomalies_topic}" if settings.training.publish_latents else ""
    return (
        f"anomalies: flagged past the {anomaly.threshold_percentile:g}th percentile of recent reference "
        f"scores{where}, {trained}; {drift}"
    )


def build_daemon(settings: Settings, registry: CollectorRegistry | None = None) -> Daemon:
    """Create topics if allowed, connect to Kafka, restore the newest snapshot and start /metrics."""
    from streamvi.io.admin import ensure_topics
    from streamvi.stream.worker import WorkerLoop

    cluster, strategy = start_cluster(settings)
    for line in startup_lines(settings):
        log.info("%s", line)
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)
    metrics.set_build_info(versions())
    health = Health(settings.metrics.liveness_timeout_seconds)
    # One writer per snapshot directory, for the daemon's whole life: checked before anything else.
    # Of several trainer workers only the chief writes (the others read the store it shares).
    lock = SnapshotStore(settings.snapshots.dir).lock() if cluster is None or cluster.is_chief else None
    server = None
    sink: OutputSink | None = None
    source: RecordSource | None = None
    try:
        if settings.metrics.enabled:
            server = MetricsServer(registry, health, settings.metrics.host, settings.metrics.port).start()
        if settings.kafka.create_topics:
            ensure_topics(settings.kafka)
        trainer = (
            build_trainer(settings) if strategy is None else build_distributed_trainer(settings, strategy)
        )
        store = SnapshotStore(
            settings.snapshots.dir,
            keep=settings.snapshots.keep,
            on_corrupt=lambda path, reason: metrics.corrupt_snapshots.inc(),
            progress_file=progress_file(cluster),
        )
        sink, source = kafka_clients(
            settings,
            transactional_id=settings.processing.transactional_id_for(
                settings.kafka.group_id, None if cluster is None else cluster.index
            ),
        )
        role = (
            OnlineLoop if cluster is None else functools.partial(WorkerLoop, topic=settings.kafka.input_topic)
        )
        loop = role(
            source=source,
            sink=sink,
            decoder=build_decoder(settings),
            trainer=trainer,
            store=store,
            topics=output_topics(settings, per_record=settings.training.publish_latents),
            policy=CheckpointPolicy(settings.snapshots.every_steps, settings.snapshots.every_seconds),
            max_batch_latency_seconds=settings.training.max_batch_latency_ms / 1000.0,
            pipeline_depth=settings.training.pipeline_depth,
            metrics=metrics,
            health=health,
            snapshot_meta=snapshot_meta(settings),
            max_poll_records=settings.kafka.max_poll_records,
            lag_interval_seconds=settings.metrics.lag_interval_seconds,
            evaluation=evaluation_policy(settings),
            share=TrainingShare(
                settings.training.sample_fraction, score_all=settings.training.publish_latents
            ),
            processing=processing_policy(settings),
            anomaly=anomaly_monitor(settings),
        )
        restored = loop.restore()
    except BaseException as exc:
        for client in (source, sink):
            if client is not None:
                try:
                    client.close()
                except Exception:  # already failing; the original error is what matters
                    log.debug("closing a client after a failed start", exc_info=True)
        if server is not None:
            server.stop()
        if lock is not None:
            lock.release()
        if isinstance(exc, KafkaError | KafkaException):
            raise settings.kafka.failure(exc) from exc
        raise
    return Daemon(settings, loop, server, restored, lock)
