"""Throughput of the daemon against its unavoidable parts, in one run, on the embedded broker.

Prints one JSON object with, for the same payload and model:
- ``end_to_end``: records/s of the daemon (``streamvi run`` in-process: decode, train, publish
  latents and metrics, snapshot, commit), timed from the end of the first training step (so the
  group join and the XLA compile are excluded; both are reported separately) to the final commit;
- ``consume_decode``: records/s of a bare kafka-python consumer reading the same topic and
  decoding every record with the daemon's decoder;
- ``train_step``: records/s of the isolated training step on a resident batch;
- ``ratio_to_slowest_part``: end_to_end / min(consume_decode, train_step).

Usage: python bench/throughput.py [--records N] [--format json|f32] [--dim D] [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from streamvi.config import Settings, load_settings
from streamvi.datasets import encode_record
from streamvi.estimators import SGVBAnalyticKL
from streamvi.io.admin import ensure_topics
from streamvi.io.base import RawRecord
from streamvi.io.codecs import RecordDecoder
from streamvi.io.embedded import EmbeddedBroker
from streamvi.model import VAE
from streamvi.runtime import build_daemon, build_trainer, versions
from streamvi.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from handwritten import run_handwritten

ROOT = Path(__file__).resolve().parents[1]


def payload(n_distinct: int, dim: int, seed: int = 0) -> np.ndarray:
    """MNIST-like binary images: thresholded smooth random fields, ~20% of pixels on."""
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(dim))
    if side * side != dim:
        return (rng.random((n_distinct, dim)) < 0.2).astype(np.float32)
    coarse = rng.normal(size=(n_distinct, 7, 7))
    fine = np.kron(coarse, np.ones((side // 7 + 1, side // 7 + 1)))[:, :side, :side]
    return (fine > 0.85).reshape(n_distinct, dim).astype(np.float32)


def produce(settings: Settings, x: np.ndarray, count: int, fmt: str) -> int:
    producer = KafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, acks=1, linger_ms=20, batch_size=1_048_576
    )
    size = 0
    encoded = [encode_record(x[i], f"r{i}", fmt) for i in range(len(x))]
    for i in range(count):
        value = encoded[i % len(encoded)]
        size = len(value)
        producer.send(settings.kafka.input_topic, key=f"r{i}".encode(), value=value)
    producer.flush()
    producer.close()
    return size


def consume_decode_rate(settings: Settings, count: int) -> float:
    decoder = RecordDecoder(settings.input.format, settings.input.dim, settings.input.max_record_bytes)
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        enable_auto_commit=False,
        max_poll_records=settings.kafka.max_poll_records,
        fetch_max_bytes=settings.kafka.fetch_max_bytes,
    )
    tp = TopicPartition(settings.kafka.input_topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    seen = 0
    started = time.perf_counter()
    while seen < count:
        for messages in consumer.poll(timeout_ms=500, max_records=settings.kafka.max_poll_records).values():
            for m in messages:
                decoder.decode(RawRecord(m.topic, m.partition, m.offset, m.key, m.value))
            seen += len(messages)
    elapsed = time.perf_counter() - started
    consumer.close()
    return seen / elapsed


def train_step_rate(settings: Settings, x: np.ndarray, seconds: float = 5.0) -> dict[str, float]:
    trainer = build_trainer(settings)
    batch = settings.training.batch_size
    buffer = np.ascontiguousarray(np.resize(x, (batch, x.shape[1])), dtype=np.float32)
    started = time.perf_counter()
    trainer.train(buffer, batch)
    compile_seconds = time.perf_counter() - started
    steps = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        trainer.train(buffer, batch)
        steps += 1
    elapsed = time.perf_counter() - started
    return {"records_per_s": steps * batch / elapsed, "compile_seconds": compile_seconds, "steps": steps}


def end_to_end(settings: Settings, count: int) -> tuple[dict[str, float], Trainer]:
    started = time.perf_counter()
    daemon = build_daemon(settings, CollectorRegistry())
    built = time.perf_counter()
    trainer = daemon.loop.trainer
    first: dict[str, float] = {}
    original_train = trainer.train

    def timed_train(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = original_train(*args, **kwargs)
        if "end" not in first:
            first["end"] = time.perf_counter()
            first["records"] = result.scores.size
            first["step_seconds"] = result.duration_seconds
        return result

    trainer.train = timed_train  # type: ignore[method-assign]
    counts = daemon.run(max_records=count)
    finished = time.perf_counter()
    assert counts.records_consumed == count == counts.latents_published, counts
    figures = {
        "records_per_s": (count - first["records"]) / (finished - first["end"]),
        "startup_seconds": built - started,
        "to_first_trained_batch_seconds": first["end"] - started,
        "first_step_seconds_incl_compile": first["step_seconds"],
        "total_seconds": finished - started,
    }
    return figures, trainer


def heldout_elbo(model: VAE, x: np.ndarray, repeats: int = 5) -> float:
    """Mean ELBO (SGVB estimator B, averaged over draws) of ``model`` on held-out rows."""
    estimator = SGVBAnalyticKL(samples=8)
    c = tf.zeros((x.shape[0], 0))
    values = [
        float(
            tf.reduce_mean(
                estimator.terms(model, tf.constant(x), c, tf.constant([r, 1]), tf.constant(0, tf.int64)).bound
            )
        )
        for r in range(repeats)
    ]
    return float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--format", choices=["json", "f32"], default="json")
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--config", default=str(ROOT / "bench" / "bench.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="json only: also run bench/handwritten.py's loop on the same records and compare",
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="streamvi-bench-"))
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        settings = load_settings(
            args.config,
            [
                f"kafka.bootstrap_servers={broker.bootstrap_servers}",
                f"input.format={args.format}",
                f"input.dim={args.dim}",
                f"snapshots.dir={workdir / 'snapshots'}",
                *args.set,
            ],
        )
        ensure_topics(settings.kafka)
        x = payload(1000, args.dim)
        record_bytes = produce(settings, x, args.records, args.format)
        consume = consume_decode_rate(settings, args.records)
        step = train_step_rate(settings, x)
        e2e, daemon_trainer = end_to_end(settings, args.records)
        baseline = None
        if args.format == "json" and args.baseline:
            baseline_rate, baseline_model = run_handwritten(settings, args.records, group="bench-handwritten")
            held = payload(500, args.dim, seed=1)  # same distribution, records neither run has seen
            baseline = {
                "handwritten_records_per_s": round(baseline_rate, 1),
                "speedup_over_handwritten": round(e2e["records_per_s"] / baseline_rate, 2),
                "heldout_elbo_daemon": round(heldout_elbo(daemon_trainer.model, held), 3),
                "heldout_elbo_handwritten": round(heldout_elbo(baseline_model, held), 3),
            }
    slowest = min(consume, step["records_per_s"])
    print(
        json.dumps(
            {
                "benchmark": "throughput",
                "records": args.records,
                "format": args.format,
                "record_bytes": record_bytes,
                "model": "-".join(
                    map(str, [args.dim, *settings.model.encoder_hidden, settings.model.latent_dim])
                ),
                "batch_size": settings.training.batch_size,
                "end_to_end_records_per_s": round(e2e["records_per_s"], 1),
                "consume_decode_records_per_s": round(consume, 1),
                "train_step_records_per_s": round(step["records_per_s"], 1),
                "ratio_to_slowest_part": round(e2e["records_per_s"] / slowest, 3),
                **(baseline or {}),
                "startup_seconds": round(e2e["startup_seconds"], 2),
                "to_first_trained_batch_seconds": round(e2e["to_first_trained_batch_seconds"], 2),
                "first_step_seconds_incl_compile": round(e2e["first_step_seconds_incl_compile"], 2),
                "isolated_compile_seconds": round(step["compile_seconds"], 2),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), **versions()},
            },
            indent=2,
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
