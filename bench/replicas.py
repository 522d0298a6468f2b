"""Encoder replicas (``streamvi serve``): their rate against the plumbing, 1 vs 2 replicas, reload pause.

Prints one JSON object. Per input format (f32 and json, each on an embedded broker of its own,
``kafka.client`` from the config: librdkafka in bench/bench.yaml):

- ``raw_consume_decode_produce_records_per_s``: the replica's own record source, decoder and sink
  (same client, fetch and producer settings) reading the topic, decoding every fetch and producing
  one latents-shaped message per record (zeros for z and the bound), nothing else: the plumbing;
- ``score_step_records_per_s``: the compiled scoring step alone (encoder, one z draw, decoder: the
  per-record ELBO) on a resident batch, TensorFlow's default threads;
- ``one_replica``: one ``streamvi serve`` process on the same records, with the CPU it and the
  broker used (``cores_used``), ``ratio_to_raw`` and ``ratio_to_slowest_part`` (min of the raw
  plumbing and the scoring step);
- ``two_replicas``: two ``streamvi serve`` processes sharing the partitions, their combined rate,
  ``ratio_to_one`` and each process's cores used (on a 2-core machine two replicas cannot double:
  they share the same two cores, with the broker);
- ``reload``: one replica in-process on a backlog while a new snapshot appears every
  ``--reload-every`` seconds; p99 of the time between consecutive published batches while a
  snapshot is being loaded and switched to, against p99 without a reload in progress.

The records are produced once, before anything runs; each measurement reads all of them from the
start in a consumer group of its own. Replica rates are taken in the steady state: from the moment
every replica is ready (model loaded, partitions assigned, the group settled) until the backlog is
encoded, by the replicas' /metrics. The reload run gets twice as many records more, so that several
snapshots appear while it runs. The default of 150,000 records gives one replica several seconds of
steady state on a 2-core machine (20,000 gave it less than one, and its rate then moved with the
group's first fetches).

Usage: python bench/replicas.py [--records N] [--format json|f32|both] [--config FILE]
       [--set SECTION.KEY=VALUE ...] [--partitions N] [--reload-every SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from confluent_kafka import Producer

from streamvi.config import Settings, load_settings
from streamvi.datasets import encode_record
from streamvi.io.admin import ensure_topics
from streamvi.io.codecs import latent_messages
from streamvi.io.embedded import EmbeddedBroker
from streamvi.io.rdkafka_options import rdkafka_config
from streamvi.replica import build_replica, replica_kafka
from streamvi.runtime import build_decoder, build_trainer, kafka_clients, versions
from streamvi.snapshots import SnapshotStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, payload, process_cpu_seconds

from tests.integration.faultkit import DaemonProcess


def fast_produce(settings: Settings, x: np.ndarray, count: int, fmt: str) -> float:
    """Append ``count`` records through librdkafka; return the producer's rate (records/s)."""
    producer = Producer(rdkafka_config(settings.kafka, "producer"))
    encoded = [encode_record(x[i], f"r{i}", fmt) for i in range(len(x))]
    started = time.perf_counter()
    topic = settings.kafka.input_topic
    for i in range(count):
        while True:
            try:
                producer.produce(topic, key=f"r{i}".encode(), value=encoded[i % len(encoded)])
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush()
    return count / (time.perf_counter() - started)


def write_snapshot(settings: Settings, step: int) -> None:
    """A trusted (at_least_once) snapshot of a freshly initialised model at ``step``."""
    trainer = build_trainer(settings)
    trainer.step_counter.assign(step)
    SnapshotStore(settings.snapshots.dir, keep=1000).write(
        tf.train.Checkpoint(**trainer.checkpoint_objects()),
        step,
        {"config": settings.public_dict(), "offsets": {}},
    )


def raw_rate(settings: Settings, count: int) -> dict[str, float]:
    """The plumbing alone: source, decoder and sink of the replica, one latents-shaped message per
    record; from the first record to the final flush."""
    kafka = replica_kafka(settings).model_copy(update={"group_id": f"{settings.serving.group_id}-raw"})
    sink, source = kafka_clients(settings, kafka)
    decoder = build_decoder(settings)
    width = settings.model.latent_dim
    seen, started, cpu_started = 0, 0.0, 0.0
    try:
        while seen < count:
            records = source.poll(0.5, settings.kafka.max_poll_records)
            if not records:
                continue
            if not seen:
                started, cpu_started = time.perf_counter(), time.process_time()
            decoded = decoder.decode_many(records)
            n = len(records)
            zeros = np.zeros((n, width), np.float32)
            sink.send_many(
                latent_messages(
                    settings.kafka.latents_topic,
                    records,
                    decoded.record_ids,
                    zeros,
                    zeros,
                    zeros[:, 0],
                    0,
                    "elbo",
                )
            )
            seen += n
        sink.flush()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        source.close()
        sink.close()
    return {"records_per_s": round(seen / elapsed, 1), "cores_used": round(cpu / elapsed, 2)}


def _ready(process: DaemonProcess) -> bool:
    assert process.metrics_url is not None
    try:
        with urllib.request.urlopen(process.metrics_url.replace("/metrics", "/readyz"), timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def replicas_rate(settings: Settings, n: int, count: int, workdir: Path, broker_pid: int) -> dict[str, Any]:
    """``n`` ``streamvi serve`` processes in a group of their own on the ``count`` records already
    in the topic; timed from the moment all are ready to the end of the backlog, by their /metrics."""
    group = f"{settings.serving.group_id}-{n}"
    run_settings = settings.model_copy(
        update={"serving": settings.serving.model_copy(update={"group_id": group})}
    )
    processes = [
        DaemonProcess(run_settings, workdir / f"replica-{n}-{i}.log", command="serve") for i in range(n)
    ]
    try:
        for process in processes:
            process.wait_for_metrics()
        deadline = time.monotonic() + 180
        while not all(_ready(p) for p in processes):
            if time.monotonic() > deadline:
                raise RuntimeError("replicas never became ready:\n" + processes[0].log_text()[-2000:])
            time.sleep(0.05)
        pids = [p.process.pid for p in processes]
        total = lambda: sum(p.sample("streamvi_records_encoded_total") for p in processes)  # noqa: E731
        first_time, first_count = time.perf_counter(), total()
        cpu_before = [process_cpu_seconds(pid) for pid in pids]
        broker_before = process_cpu_seconds(broker_pid)
        while (done := total()) < count:
            time.sleep(0.05)
        elapsed = time.perf_counter() - first_time
        cpu = [process_cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
        broker = process_cpu_seconds(broker_pid) - broker_before
        return {
            "records_per_s": round((done - first_count) / elapsed, 1),
            "records_timed": int(done - first_count),
            "cores_used_per_replica": [round(c / elapsed, 2) for c in cpu],
            "broker_cores_used": round(broker / elapsed, 2),
            "records_per_replica": [p.sample("streamvi_records_encoded_total") for p in processes],
        }
    finally:
        for process in processes:
            process.signal(15)
        for process in processes:
            process.wait(60)


def score_step_rate(settings: Settings, x: np.ndarray, seconds: float = 4.0) -> float:
    """The replica's compiled scoring step alone on a resident batch (records/s)."""
    trainer = build_trainer(settings)
    batch = np.resize(x, (settings.training.batch_size, x.shape[1])).astype(np.float32)
    trainer.evaluate(batch)  # compile
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        trainer.evaluate(batch)
        done += batch.shape[0]
    return done / (time.perf_counter() - started)


def reload_pause(settings: Settings, count: int, every: float) -> dict[str, Any]:
    """One replica in-process on the backlog of ``count`` records while a newer snapshot appears
    every ``every`` seconds: the gaps between consecutive published batches with and without a reload."""
    group = f"{settings.serving.group_id}-reload"
    run_settings = settings.model_copy(
        update={
            "serving": settings.serving.model_copy(
                update={"group_id": group, "reload_interval_seconds": 0.2}
            ),
            "metrics": settings.metrics.model_copy(update={"enabled": False}),
        }
    )
    replica = build_replica(run_settings)
    model = replica.watcher.wait_for_first(threading.Event())
    assert model is not None
    loop = replica.loop = replica._loop(model)
    published: list[float] = []
    loading: list[tuple[float, float]] = []
    original_batch, original_load, original_use = loop.publisher.batch, replica.watcher._load, loop.use

    def batch(*args: Any, **kwargs: Any) -> None:
        original_batch(*args, **kwargs)
        published.append(time.perf_counter())

    def load(info: Any) -> Any:
        loading.append((time.perf_counter(), float("inf")))
        return original_load(info)

    def use(model: Any) -> None:
        original_use(model)
        if loading and loading[-1][1] == float("inf"):
            loading[-1] = (loading[-1][0], time.perf_counter())

    loop.publisher.batch = batch  # type: ignore[method-assign]
    replica.watcher._load = load  # type: ignore[method-assign]
    loop.use = use  # type: ignore[method-assign]
    stop = threading.Event()
    step = [model.info.step]

    def writer() -> None:
        while not stop.wait(every):
            step[0] += 1
            write_snapshot(settings, step[0])

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        loop.run(max_records=count)
    finally:
        stop.set()
        thread.join()
        replica.close()
    gaps = np.diff(np.array(published))
    ends = np.array(published[1:])
    starts = ends - gaps
    during = np.zeros(len(gaps), dtype=bool)
    for begin, end in loading:
        during |= (starts <= end) & (ends >= begin)
    quiet, busy = gaps[~during], gaps[during]
    p99 = lambda a: float(np.percentile(a, 99)) if len(a) else float("nan")  # noqa: E731
    return {
        "switches": sum(1 for _, end in loading if end != float("inf")),
        "batches": len(gaps) + 1,
        "p99_batch_gap_ms_without_reload": round(1000 * p99(quiet), 2),
        "p99_batch_gap_ms_during_reload": round(1000 * p99(busy), 2),
        "ratio_during_to_without": round(p99(busy) / p99(quiet), 2) if len(quiet) and len(busy) else None,
        "batches_during_reload": int(during.sum()),
    }


def measure_format(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"streamvi-bench-replicas-{fmt}-"))
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        settings = load_settings(
            args.config,
            [
                f"kafka.bootstrap_servers={broker.bootstrap_servers}",
                f"kafka.topic_partitions={args.partitions}",
                f"input.format={fmt}",
                f"input.dim={args.dim}",
                f"snapshots.dir={workdir / 'snapshots'}",
                "serving.commit_interval_seconds=2",
                "metrics.port=0",
                *args.set,
            ],
        )
        ensure_topics(settings.kafka)
        write_snapshot(settings, 1)
        x = payload(1000, args.dim)
        fast_produce(settings, x, args.records, fmt)
        raw = raw_rate(settings, args.records)
        score = score_step_rate(settings, x)
        one = replicas_rate(settings, 1, args.records, workdir, broker.pid)
        two = replicas_rate(settings, 2, args.records, workdir, broker.pid)
        fast_produce(settings, x, 2 * args.records, fmt)
        reload = reload_pause(settings, 3 * args.records, args.reload_every)
    slowest = min(raw["records_per_s"], score)
    return {
        "raw_consume_decode_produce": raw,
        "score_step_records_per_s": round(score, 1),
        "one_replica": {
            **one,
            "ratio_to_raw": round(one["records_per_s"] / raw["records_per_s"], 3),
            "ratio_to_slowest_part": round(one["records_per_s"] / slowest, 3),
        },
        "two_replicas": {**two, "ratio_to_one": round(two["records_per_s"] / one["records_per_s"], 3)},
        "reload": reload,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=150_000)
    parser.add_argument("--format", choices=["json", "f32", "both"], default="both")
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--reload-every", type=float, default=1.0)
    parser.add_argument("--config", default=str(ROOT / "bench" / "bench.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    formats = ["f32", "json"] if args.format == "both" else [args.format]
    results: dict[str, Any] = {
        "benchmark": "replicas",
        "config": os.path.relpath(Path(args.config).resolve(), ROOT),
        "overrides": args.set,
        "records": args.records,
        "partitions": args.partitions,
        "formats": {fmt: measure_format(args, fmt) for fmt in formats},
        "machine": {"cpus": os.cpu_count(), **versions()},
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
