"""Prometheus metrics (in a registry passed in) and the HTTP server for /metrics, /livez and /readyz."""

from __future__ import annotations

import logging
import math
import platform
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from streamvi.io.codecs import DEAD_LETTER_REASONS

log = logging.getLogger(__name__)

_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class StreamMetrics:
    """The metrics every role exports (trainer and encoder replica), named ``streamvi_<thing>_<unit>``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        disable_created_metrics()  # the *_created series only add noise to dashboards
        self.registry = registry
        self.records_consumed = Counter(
            "streamvi_records_consumed", "Input records fetched from the input topic", registry=registry
        )
        self.dead_letters = Counter(
            "streamvi_dead_letters",
            "Records sent to the dead-letter topic, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason=reason)
        self.latents_published = Counter(
            "streamvi_latents_published", "Latent records published", registry=registry
        )
        self.model_step = Gauge(
            "streamvi_model_step",
            "Step of the model in use (the trainer's current step; a replica's loaded snapshot's)",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "streamvi_consumer_lag_records",
            "High-water mark minus next offset to process, per input partition",
            ["topic", "partition"],
            registry=registry,
        )
        self.commits = Counter(
            "streamvi_offset_commits", "Offset commits to the consumer group", registry=registry
        )

        self.replayed_records = Counter(
            "streamvi_replayed_records",
            "Records consumed again after a restart because their outputs may already have been published",
            registry=registry,
        )
        self.outputs_withheld = Counter(
            "streamvi_outputs_withheld",
            "Exactly-once: records trained again after a restore whose outputs a committed "
            "transaction had already published (not sent again)",
            registry=registry,
        )
        self.build_info = Info("streamvi_build", "Versions of streamvi and its runtime", registry=registry)
        self.anomalies_flagged = Counter(
            "streamvi_anomalies_flagged",
            "Records whose score passed anomaly.threshold_percentile of the recent held-out scores",
            registry=registry,
        )
        self.anomaly_threshold_percentile = Gauge(
            "streamvi_anomaly_threshold_percentile",
            "anomaly.threshold_percentile: a record is flagged when its score passes this percentile",
            registry=registry,
        )
        self.anomaly_threshold_elbo = Gauge(
            "streamvi_anomaly_threshold_elbo_nats",
            "ELBO (nats) below which a record is flagged, from the reference sketch (NaN: uncalibrated)",
            registry=registry,
        )
        self.anomaly_reference_records = Gauge(
            "streamvi_anomaly_reference_records",
            "Held-out scores in the sketch that percentiles are taken against",
            registry=registry,
        )

    def set_build_info(self, versions: dict[str, str]) -> None:
        self.build_info.info(dict(versions, python=platform.python_version()))


class Metrics(StreamMetrics):
    """Every metric the trainer exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.records_trained = Counter(
            "streamvi_records_trained", "Records the model was trained on", registry=registry
        )
        self.records_outside_share = Counter(
            "streamvi_records_outside_share",
            "Valid records outside the training share (training.sample_fraction): not trained on",
            registry=registry,
        )
        self.train_steps = Counter("streamvi_train_steps", "Optimiser steps taken", registry=registry)
        self.elbo = Gauge(
            "streamvi_elbo_nats",
            "Prequential ELBO per record of the last batch (higher is better)",
            registry=registry,
        )
        self.kl = Gauge(
            "streamvi_kl_nats", "KL(q(z|x) || p(z)) per record of the last batch", registry=registry
        )
        self.reconstruction = Gauge(
            "streamvi_reconstruction_nats",
            "Expected log-likelihood E_q[log p(x|z)] per record of the last batch",
            registry=registry,
        )
        self.gradient_norm = Gauge(
            "streamvi_gradient_norm",
            "Global norm of the model's gradient in the last step, before clipping",
            registry=registry,
        )
        self.gradient_clipped = Counter(
            "streamvi_gradient_clipped",
            "Applied updates whose model gradient was clipped to training.clip_grad_norm (biased updates)",
            registry=registry,
        )
        self.rehearsal_updates = Counter(
            "streamvi_rehearsal_updates",
            "Further updates on batches drawn from the rehearsal window that applied "
            "(training.rehearsal_steps per training step)",
            registry=registry,
        )
        self.learning_rate = Gauge("streamvi_learning_rate", "Current learning rate", registry=registry)
        self.step_duration = Histogram(
            "streamvi_step_duration_seconds",
            "Wall time of one training step",
            buckets=_STEP_BUCKETS,
            registry=registry,
        )
        self.step_compile = Gauge(
            "streamvi_step_compile_seconds",
            "Time to trace and XLA-compile the training step at start-up (overlapped with the group join)",
            registry=registry,
        )
        self.batch_size = Histogram(
            "streamvi_batch_size_records",
            "Records per trained micro-batch",
            buckets=_SIZE_BUCKETS,
            registry=registry,
        )
        self.snapshots = Counter("streamvi_snapshots", "Snapshots written", registry=registry)
        self.snapshot_duration = Histogram(
            "streamvi_snapshot_duration_seconds", "Wall time of writing one snapshot", registry=registry
        )
        self.last_snapshot = Gauge(
            "streamvi_last_snapshot_timestamp_seconds",
            "Unix time of the last durable snapshot",
            registry=registry,
        )
        self.corrupt_snapshots = Counter(
            "streamvi_corrupt_snapshots", "Snapshots found corrupt and skipped", registry=registry
        )
        # Held-out evaluation on the hash-selected reservoir that is never trained on.
        self.heldout_elbo = Gauge(
            "streamvi_heldout_elbo_nats", "Mean ELBO per record on the held-out reservoir", registry=registry
        )
        self.heldout_log_likelihood = Gauge(
            "streamvi_heldout_log_likelihood_nats",
            "Importance-weighted estimate of log p(x) per record on the held-out reservoir",
            registry=registry,
        )
        self.heldout_records = Gauge(
            "streamvi_heldout_records", "Records currently in the held-out reservoir", registry=registry
        )
        # Guarding the model against garbage updates and reporting replays.
        self.nonfinite_updates = Counter(
            "streamvi_nonfinite_updates",
            "Updates skipped because the loss or gradients were not finite",
            registry=registry,
        )
        self.training_diverged = Gauge(
            "streamvi_training_diverged",
            "1 after too many non-finite updates in a row forced a restore of the last good snapshot",
            registry=registry,
        )
        self.flagged_not_trained = Counter(
            "streamvi_flagged_records_not_trained",
            "Flagged records left out of training (anomaly.train_on_flagged off, not adapting to a drift)",
            registry=registry,
        )
        self.drift_detected = Counter(
            "streamvi_drift_detected",
            "Drifts detected in the stream of held-out scores (anomaly.drift_detector)",
            registry=registry,
        )
        self.last_drift = Gauge(
            "streamvi_last_drift_timestamp_seconds",
            "Unix time of the last detected drift (0: none since the model was created)",
            registry=registry,
        )
        self.seconds_since_drift = Gauge(
            "streamvi_seconds_since_drift",
            "Seconds since the last detected drift (NaN: none since the model was created)",
            registry=registry,
        )
        self._last_drift_time = 0.0
        self.seconds_since_drift.set_function(self._seconds_since_drift)
        self.drift_adapting = Gauge(
            "streamvi_drift_adapting",
            "1 while the model adapts after a drift (flagged records trained on, learning rate raised)",
            registry=registry,
        )

    def record_drift_time(self, when: float) -> None:
        """The last drift's time (0: none): both drift gauges follow it."""
        self._last_drift_time = when
        self.last_drift.set(when)

    def _seconds_since_drift(self) -> float:
        last = self._last_drift_time
        return time.time() - last if last > 0 else math.nan


#: Why a newer snapshot was not loaded by an encoder replica (``streamvi_snapshot_reload_failures_total``).
RELOAD_FAILURE_REASONS = ("corrupt", "config_mismatch", "load_error")


class EncoderMetrics(StreamMetrics):
    """What an encoder replica exports besides the shared metrics: the model it serves and reloads."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.time) -> None:
        super().__init__(registry)
        self._clock = clock
        self._snapshot_written_at: float | None = None
        self.records_encoded = Counter(
            "streamvi_records_encoded", "Records encoded by this replica", registry=registry
        )
        self.snapshot_reloads = Counter(
            "streamvi_snapshot_reloads", "Newer trusted snapshots loaded and switched to", registry=registry
        )
        self.snapshot_reload_failures = Counter(
            "streamvi_snapshot_reload_failures",
            "Newer snapshots skipped (the replica kept serving its model), by reason",
            ["reason"],
            registry=registry,
        )
        for reason in RELOAD_FAILURE_REASONS:
            self.snapshot_reload_failures.labels(reason=reason)
        self.snapshot_age = Gauge(
            "streamvi_snapshot_age_seconds",
            "Seconds since the snapshot in use was written (NaN until one is loaded)",
            registry=registry,
        )
        self.snapshot_age.set_function(self._age)

    def serving(self, step: int, written_at: float) -> None:
        """The replica switched to the snapshot of ``step``, written at unix time ``written_at``."""
        self._snapshot_written_at = written_at
        self.model_step.set(step)

    def _age(self) -> float:
        written = self._snapshot_written_at
        return math.nan if written is None else max(0.0, self._clock() - written)


class Health:
    """Liveness and readiness, read by the HTTP server at each request.

    Live means the loop goes round: it calls :meth:`beat` at the top of every iteration, and once
    no beat came for ``liveness_timeout_seconds`` the process is not live (``/livez`` answers 503,
    so an orchestrator restarts it). The age of the last beat is taken from a monotonic clock when
    asked, so a stuck loop cannot keep it fresh; the clock starts when the Health is made (the
    daemon's start), so a start-up that never reaches the loop is not live either.
    ``liveness_timeout_seconds=None``: always live.
    """

    def __init__(
        self,
        liveness_timeout_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if liveness_timeout_seconds is not None and not liveness_timeout_seconds > 0:
            raise ValueError("liveness_timeout_seconds must be positive (or None)")
        self._lock = threading.Lock()
        self.liveness_timeout_seconds = liveness_timeout_seconds
        self._clock = clock
        self._last_beat = clock()  # a float written and read whole: no lock on the loop's path
        self.model_loaded = False
        self.partitions_assigned = False
        self.broker_connected = True

    def set(
        self,
        *,
        model_loaded: bool | None = None,
        partitions_assigned: bool | None = None,
        broker_connected: bool | None = None,
    ) -> None:
        with self._lock:
            if model_loaded is not None:
                self.model_loaded = model_loaded
            if partitions_assigned is not None:
                self.partitions_assigned = partitions_assigned
            if broker_connected is not None:
                self.broker_connected = broker_connected

    def beat(self) -> None:
        """The loop went round once more."""
        self._last_beat = self._clock()

    def seconds_since_beat(self) -> float:
        """How long ago the loop last went round (or the Health was made)."""
        return max(0.0, self._clock() - self._last_beat)

    @property
    def live(self) -> bool:
        timeout = self.liveness_timeout_seconds
        return timeout is None or self.seconds_since_beat() <= timeout

    @property
    def ready(self) -> bool:
        with self._lock:
            return self.model_loaded and self.partitions_assigned and self.broker_connected


class MetricsServer:
    """A small threaded HTTP server: /metrics (Prometheus text), /livez, /readyz."""

    def __init__(self, registry: CollectorRegistry, health: Health, host: str, port: int) -> None:
        self.registry = registry
        self.health = health
        handler = self._handler_class()
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="streamvi-metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on %s", self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path == "/livez":
                    health = server.health
                    if health.live:
                        self._reply(200, b"ok\n")
                    else:
                        self._reply(
                            503,
                            f"not live: the loop has not gone round for {health.seconds_since_beat():.1f}s "
                            f"(metrics.liveness_timeout_seconds={health.liveness_timeout_seconds:g})\n".encode(),
                        )
                elif path == "/readyz":
                    ready = server.health.ready
                    self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics http: %s", format % args)

        return Handler
