"""The end-to-end demo: embedded broker, the digits set streamed in, the daemon learning on it."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
from kafka import KafkaConsumer, KafkaProducer

from streamvi.config import Settings
from streamvi.datasets import Dataset, load_digits
from streamvi.io.admin import ensure_topics
from streamvi.io.embedded import EmbeddedBroker
from streamvi.io.producer import produce_dataset

log = logging.getLogger(__name__)

#: Malformed records mixed into the demo stream to show the dead-letter path.
BAD_RECORDS = (b"{not json", b'{"x": "not a vector"}', b'{"x": [1.0, 2.0]}')


@dataclass(frozen=True)
class DemoSummary:
    records: int
    trained: int
    dead_letters: int
    steps: int
    first_elbo: float
    last_elbo: float
    metrics_url: str | None
    snapshot_dir: Path
    heldout: dict[str, float]
    report_files: list[Path]


def _elbo_trajectory(settings: Settings, steps: int) -> list[float]:
    consumer = KafkaConsumer(
        settings.kafka.metrics_topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
    )
    values: list[float] = []
    try:
        for message in consumer:
            payload = orjson.loads(message.value)
            if payload.get("kind") == "step":
                values.append(float(payload["elbo"]))
            if len(values) >= steps:
                break
    finally:
        consumer.close()
    return values


def run_demo(
    base: Settings,
    passes: int = 10,
    workdir: Path | None = None,
    linger_seconds: float = 0.0,
    echo: Callable[[str], None] = print,
) -> DemoSummary:
    """Start a broker, stream the digits ``passes`` times (plus a few bad records) and train on them."""
    from prometheus_client import CollectorRegistry

    from streamvi.runtime import build_daemon

    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="streamvi-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        echo(f"embedded broker on {broker.bootstrap_servers}")
        settings = base.model_copy(
            update={
                "kafka": base.kafka.model_copy(update={"bootstrap_servers": [broker.bootstrap_servers]}),
                "snapshots": base.snapshots.model_copy(update={"dir": workdir / "snapshots"}),
            }
        )
        ensure_topics(settings.kafka)
        data = load_digits()
        sent = produce_dataset(
            settings.kafka, data, settings.kafka.input_topic, settings.input.format, repeat=passes
        )
        producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
        for value in BAD_RECORDS:
            producer.send(settings.kafka.input_topic, value=value)
        producer.flush()
        producer.close()
        total = sent + len(BAD_RECORDS)
        echo(f"produced {sent} digits records ({passes} passes) and {len(BAD_RECORDS)} malformed ones")
        daemon = build_daemon(settings, CollectorRegistry())
        echo(f"metrics: {daemon.metrics_url}")
        started = time.monotonic()
        counts = daemon.loop.run(max_records=total)
        elapsed = time.monotonic() - started
        if linger_seconds > 0:
            echo(f"serving {daemon.metrics_url} for {linger_seconds:.0f}s more")
            time.sleep(linger_seconds)
        daemon.close()
        elbos = _elbo_trajectory(settings, counts.steps)
    report_files = _write_report(workdir, data)
    window = max(1, min(10, len(elbos) // 10))
    summary = DemoSummary(
        records=counts.records_consumed,
        trained=counts.records_trained,
        dead_letters=counts.dead_letters,
        steps=counts.steps,
        first_elbo=sum(elbos[:window]) / window,
        last_elbo=sum(elbos[-window:]) / window,
        metrics_url=daemon.metrics_url,
        snapshot_dir=workdir / "snapshots",
        heldout=dict(daemon.loop.state.last_heldout),
        report_files=report_files,
    )
    echo(
        f"trained on {summary.trained} records in {summary.steps} steps ({elapsed:.1f}s, "
        f"{summary.trained / max(elapsed, 1e-9):.0f} records/s); {summary.dead_letters} dead letters"
    )
    echo(
        f"prequential ELBO per record: first {window} steps {summary.first_elbo:.2f} nats, "
        f"last {window} steps {summary.last_elbo:.2f} nats"
    )
    if summary.heldout:
        held = summary.records - summary.trained - summary.dead_letters
        report = summary.heldout
        echo(
            f"held out (never trained on): {held} records; on the newest {report['records']}: "
            f"ELBO {report['elbo']:.2f} nats, "
            f"IWAE-{report['importance_samples']} log-likelihood {report['log_likelihood']:.2f} nats"
        )
    echo(
        f"snapshots in {summary.snapshot_dir}; "
        f"try: streamvi encode --snapshot {summary.snapshot_dir} --input digits"
    )
    if report_files:
        echo(f"plots: {', '.join(str(path) for path in report_files)}")
    return summary


def _write_report(workdir: Path, data: Dataset) -> list[Path]:
    """The report of the final snapshot (history, latent space by digit, reconstructions)."""
    from streamvi.report import write_report
    from streamvi.snapshots.store import SnapshotStore

    info = SnapshotStore(workdir / "snapshots").latest()
    if info is None:
        return []
    return write_report(info, workdir / "report", data).files
