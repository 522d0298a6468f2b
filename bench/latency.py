"""Latency of the daemon at a low input rate: from a record's append to its latent's append.

Target: p99 <= training.max_batch_latency_ms + 2 x the median training step time. At a low rate a
micro-batch closes on its latency bound rather than on its size; a record can then wait for that
bound, for a step already in flight and for its own step.

The daemon runs in-process on the embedded broker (``build_daemon`` + ``Daemon.run`` on a thread,
as in bench/throughput.py). Once it has joined its group and published the latents of a warm-up
stream (so the group join and the XLA compile are excluded), ``--records`` records with distinct
keys are produced one by one at ``--rate`` per second while a separate consumer tails the latents
topic. A record's latency is the wall time its latent was received minus the input record's Kafka
timestamp (CreateTime, set by our producer at send, same machine clock): this includes the
producer's send and the tail consumer's fetch on top of append-to-append, so it over-estimates
the target's quantity (conservative). The step time comes from wrapping the daemon's trainer.

Prints one JSON object: latency p50/p99/max (seconds), step time median/p99, the bound and
``within_bound``, plus where the time goes: ``to_daemon_fetch_*`` (input timestamp to the daemon's
poll returning the record, i.e. the broker's delivery; the embedded broker answers a fetch only
after part of the consumer's fetch_max_wait_ms, 500 ms by default in kafka-python) and
``to_latent_timestamp_p99_s`` (to the latent's own Kafka timestamp, set by the daemon at send).

Usage: python bench/latency.py [--rate 50] [--records 1000] [--format json|f32] [--config FILE]
                               [--set SECTION.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.producer.future import FutureRecordMetadata
from prometheus_client import CollectorRegistry

from streamvi.config import Settings, load_settings
from streamvi.datasets import encode_record
from streamvi.io.admin import ensure_topics
from streamvi.io.base import RawRecord
from streamvi.io.embedded import EmbeddedBroker
from streamvi.io.kafka_options import client_options
from streamvi.runtime import Daemon, build_daemon, versions
from streamvi.training.trainer import StepResult

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, payload


class LatentTail:
    """A consumer thread tailing the latents topic from its current end; notes each key's arrival.

    It is separate from the daemon (its own client, its own thread), so what it sees is what any
    downstream reader sees. ``fetch_max_wait_ms`` is small so an idle fetch does not delay arrivals.
    """

    def __init__(self, settings: Settings, fetch_max_wait_ms: int = 10) -> None:
        self.topic = settings.kafka.latents_topic
        self.consumer = KafkaConsumer(
            **{**client_options(settings.kafka), "client_id": "streamvi-bench-latency-tail"},
            enable_auto_commit=False,
            fetch_max_wait_ms=fetch_max_wait_ms,
        )
        partitions = self.consumer.partitions_for_topic(self.topic) or {0}
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:
            self.consumer.position(tp)  # resolve the lazy seek now, before anything is produced
        # key -> (receive wall time, the latent's own Kafka timestamp in seconds)
        self.arrivals: dict[bytes, tuple[float, float]] = {}
        self.duplicates = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            batches = self.consumer.poll(timeout_ms=50)
            received = time.time()
            for messages in batches.values():
                for message in messages:
                    if message.key in self.arrivals:
                        self.duplicates += 1
                    else:
                        self.arrivals[message.key] = (received, message.timestamp / 1000.0)

    def wait_for(self, keys: list[bytes], timeout: float, daemon_failed: threading.Event) -> bool:
        """True once a latent arrived for every key; False on timeout or if the daemon failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not daemon_failed.is_set():
            if all(key in self.arrivals for key in keys):
                return True
            time.sleep(0.05)
        return all(key in self.arrivals for key in keys)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.consumer.close()


def paced_send(
    producer: KafkaProducer, topic: str, records: list[tuple[bytes, bytes]], rate_per_s: float
) -> list[FutureRecordMetadata]:
    """Send ``records`` one at a time on a fixed schedule of ``rate_per_s``; return the send futures."""
    futures = []
    started = time.perf_counter()
    for i, (key, value) in enumerate(records):
        delay = started + i / rate_per_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futures.append(producer.send(topic, key=key, value=value))
    producer.flush()
    return futures


def start_in_background(daemon: Daemon, stop: threading.Event) -> tuple[threading.Thread, dict[str, Any]]:
    """Run the daemon until ``stop`` on a thread; the returned dict gets its counts or its error."""
    outcome: dict[str, Any] = {"failed": threading.Event()}

    def run() -> None:
        try:
            outcome["counts"] = daemon.run(stop)
        except BaseException as exc:
            outcome["error"] = exc
            outcome["failed"].set()

    thread = threading.Thread(target=run, name="streamvi-daemon", daemon=True)
    thread.start()
    return thread, outcome


def records_for(prefix: str, x: np.ndarray, count: int, fmt: str) -> list[tuple[bytes, bytes]]:
    """``count`` (key, value) pairs with distinct keys ``<prefix>-<i>``, cycling through the rows of x."""
    return [
        (f"{prefix}-{i}".encode(), encode_record(x[i % len(x)], f"{prefix}-{i}", fmt)) for i in range(count)
    ]


def measure_latency(
    settings: Settings,
    rate_per_s: float = 50.0,
    records: int = 1000,
    warmup_records: int | None = None,
    start_timeout: float = 300.0,
) -> dict[str, Any]:
    """Latency of ``records`` records produced at ``rate_per_s`` to an in-process daemon, after a
    warm-up of ``warmup_records`` (default: one second's worth, at least 10) at the same rate.

    The topics must exist. Returns latency and step-time statistics in seconds, the bound and
    whether p99 is within it; a record whose latent never arrived makes ``within_bound`` false.
    """
    if rate_per_s <= 0 or records < 1:
        raise ValueError(f"need rate_per_s > 0 and records >= 1 (got {rate_per_s}, {records})")
    warmup_records = warmup_records if warmup_records is not None else max(10, round(rate_per_s))
    kafka = settings.kafka
    x = payload(1000, settings.input.dim)
    run_id = uuid.uuid4().hex[:8]
    warmup = records_for(f"warmup-{run_id}", x, warmup_records, settings.input.format)
    measured = records_for(f"latency-{run_id}", x, records, settings.input.format)

    tail = LatentTail(settings)
    producer = KafkaProducer(
        **{**client_options(kafka), "client_id": "streamvi-bench-latency"},
        acks=1,
        enable_idempotence=False,  # acks=1 (the leader's append) is what "appended" means here
        linger_ms=0,
    )
    steps: list[tuple[float, float, int]] = []  # (wall time at the end, step seconds, batch records)
    fetched: dict[bytes | None, float] = {}  # key -> wall time the daemon's poll returned it
    try:
        started = time.perf_counter()
        registry = CollectorRegistry()
        daemon = build_daemon(settings, registry)
        original_train = daemon.loop.trainer.train_rows
        source = daemon.loop.source
        original_poll = source.poll

        def timed_train(*args: Any, **kwargs: Any) -> StepResult:
            result = original_train(*args, **kwargs)
            steps.append((time.time(), result.duration_seconds, result.scores.size))
            return result

        def timed_poll(timeout_seconds: float, max_records: int) -> list[RawRecord]:
            polled = original_poll(timeout_seconds, max_records)
            now = time.time()
            for record in polled:
                fetched.setdefault(record.key, now)
            return polled

        daemon.loop.trainer.train_rows = timed_train  # type: ignore[method-assign]
        source.poll = timed_poll  # type: ignore[method-assign]
        stop = threading.Event()
        thread, outcome = start_in_background(daemon, stop)
        try:
            paced_send(producer, kafka.input_topic, warmup, rate_per_s)
            if not tail.wait_for([k for k, _ in warmup], start_timeout, outcome["failed"]):
                raise RuntimeError(
                    f"the warm-up latents did not all arrive within {start_timeout}s "
                    f"({len(tail.arrivals)}/{len(warmup)}): {outcome.get('error')!r}"
                )
            warm_seconds = time.perf_counter() - started
            warmup_steps = len(steps)
            snapshots_before = registry.get_sample_value("streamvi_snapshots_total") or 0.0
            futures = paced_send(producer, kafka.input_topic, measured, rate_per_s)
            keys = [k for k, _ in measured]
            tail.wait_for(
                keys, 30.0 + 10 * settings.training.max_batch_latency_ms / 1000.0, outcome["failed"]
            )
            snapshots_after = registry.get_sample_value("streamvi_snapshots_total") or 0.0
        finally:
            stop.set()
            thread.join(timeout=settings.processing.shutdown_grace_seconds + 30)
    finally:
        producer.close()
        tail.close()
    if "error" in outcome:
        raise RuntimeError(f"the daemon failed: {outcome['error']!r}") from outcome["error"]

    appended = [future.get(timeout=10).timestamp / 1000.0 for future in futures]
    arrived = [tail.arrivals.get(key) for key in keys]
    latencies = np.array([a[0] - t for a, t in zip(arrived, appended, strict=True) if a is not None])
    to_latent_send = np.array([a[1] - t for a, t in zip(arrived, appended, strict=True) if a is not None])
    to_fetch = np.array([fetched[k] - t for k, t in zip(keys, appended, strict=True) if k in fetched])
    missing = sum(a is None for a in arrived)
    window_end = max((a[0] for a in arrived if a is not None), default=time.time())
    in_window = [s for s in steps[warmup_steps:] if appended[0] <= s[0] <= window_end]
    step_seconds = np.array([s[1] for s in in_window])
    step_median = float(np.median(step_seconds)) if step_seconds.size else float("nan")
    bound = settings.training.max_batch_latency_ms / 1000.0 + 2 * step_median
    p99 = float(np.percentile(latencies, 99)) if latencies.size else float("nan")

    def seconds(value: float) -> float | None:
        return round(float(value), 4) if np.isfinite(value) else None

    return {
        "benchmark": "latency",
        "rate_per_s": rate_per_s,
        "achieved_rate_per_s": round((len(appended) - 1) / (appended[-1] - appended[0]), 2)
        if len(appended) > 1 and appended[-1] > appended[0]
        else None,
        "records": records,
        "latents_received": int(latencies.size),
        "latents_missing": int(missing),
        "duplicate_latents": tail.duplicates,
        "latency_p50_s": seconds(np.percentile(latencies, 50)) if latencies.size else None,
        "latency_p99_s": seconds(p99) if latencies.size else None,
        "latency_max_s": seconds(latencies.max()) if latencies.size else None,
        "latency_mean_s": seconds(latencies.mean()) if latencies.size else None,
        "bound_s": seconds(bound),
        "within_bound": bool(missing == 0 and p99 <= bound),
        "max_batch_latency_ms": settings.training.max_batch_latency_ms,
        "step_seconds_median": seconds(step_median),
        "step_seconds_p99": seconds(np.percentile(step_seconds, 99)) if step_seconds.size else None,
        "steps": len(in_window),
        "records_per_step_mean": round(float(np.mean([s[2] for s in in_window])), 1) if in_window else None,
        # Where the time goes, from the input's timestamp: to the daemon's poll returning the record
        # (the broker's fetch delivery), and to the latent's own Kafka timestamp (set by the daemon's
        # producer at send: everything but the output's delivery and the tail's fetch).
        "to_daemon_fetch_p50_s": seconds(np.percentile(to_fetch, 50)) if to_fetch.size else None,
        "to_daemon_fetch_p99_s": seconds(np.percentile(to_fetch, 99)) if to_fetch.size else None,
        "to_latent_timestamp_p99_s": seconds(np.percentile(to_latent_send, 99))
        if to_latent_send.size
        else None,
        "snapshots_in_window": int(snapshots_after - snapshots_before),
        "warmup_records": warmup_records,
        "to_warm_seconds": round(warm_seconds, 2),
        "format": settings.input.format,
        "batch_size": settings.training.batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=50.0, help="input records per second")
    parser.add_argument("--records", type=int, default=1000, help="measured records (after a warm-up)")
    parser.add_argument("--format", choices=["json", "f32"], default="json")
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--config", default=str(ROOT / "bench" / "bench.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="streamvi-latency-") as tmp,
        EmbeddedBroker(log_file=Path(tmp) / "broker.log") as broker,
    ):
        settings = load_settings(
            args.config,
            [
                f"kafka.bootstrap_servers={broker.bootstrap_servers}",
                f"input.format={args.format}",
                f"input.dim={args.dim}",
                f"snapshots.dir={Path(tmp) / 'snapshots'}",
                *args.set,
            ],
        )
        ensure_topics(settings.kafka)
        result = measure_latency(settings, args.rate, args.records)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), **versions()}
    print(json.dumps(result, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
