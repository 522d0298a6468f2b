"""Every throughput figure of the daemon in one JSON object, for the config in ``--config``.

For each input format (json and f32, each on its own embedded broker):
- ``end_to_end_records_per_s``: the daemon in-process (``streamvi run``: decode, train, publish
  latents and metrics, snapshot, commit), timed from the end of the first training step (so the
  group join and the XLA compile, which overlap, are excluded; both are under ``startup``) to the
  final commit, with where its CPU went (``cpu``: the loop thread, the training step, the Kafka clients'
  threads, the broker, and the cores used in all);
- ``consume_decode_records_per_s``: the daemon's record source alone (same client library and
  fetch settings) reading the same topic, decoding every fetch with the daemon's decoder;
- ``train_step_records_per_s``: the compiled training step alone on a resident batch;
- ``ratio_to_slowest_part``: end to end / min(consume+decode, step).
Then ``startup_of_streamvi_run`` (bench/startup.py: a ``streamvi run`` subprocess from launch to
its first reported trained batch, the XLA compile apart); on JSON input, bench/handwritten.py's
loop on the same records (rate, and held-out ELBO of both models after the same records);
``latency`` (bench/latency.py: p99 append-to-latent at a low rate against the batch latency bound
plus two step times); ``memory`` (bench/memory.py: daemon RSS at ``--memory-early`` and
``--memory-total`` records, f32 input).

Usage: python bench/throughput.py [--records N] [--format json|f32|both] [--config FILE]
       [--set SECTION.KEY=VALUE ...] [--no-baseline] [--no-startup] [--no-latency]
       [--memory-total N | 0]
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
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from prometheus_client import CollectorRegistry

from streamvi.config import Settings, load_settings
from streamvi.estimators import SGVBAnalyticKL
from streamvi.io.admin import ensure_topics
from streamvi.io.codecs import RecordDecoder
from streamvi.io.embedded import EmbeddedBroker
from streamvi.model import VAE
from streamvi.runtime import build_daemon, build_trainer, record_source, versions
from streamvi.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, CpuSplit, payload, produce
from handwritten import BASELINE_BATCH, run_handwritten
from latency import measure_latency
from memory import measure_memory
from startup import measure_startup


def consume_decode_rate(settings: Settings, count: int) -> dict[str, float]:
    """The daemon's own record source (same client library and fetch settings, a group of its own)
    decoding every fetch with the daemon's decoder, and nothing else; timed from the first record."""
    kafka = settings.kafka.model_copy(update={"group_id": f"{settings.kafka.group_id}-consume-decode"})
    decoder = RecordDecoder(
        settings.input.format, settings.input.dim, settings.input.max_record_bytes, settings.input.context_dim
    )
    source = record_source(kafka)
    seen = 0
    started = cpu_started = 0.0
    while seen < count:
        records = source.poll(0.5, kafka.max_poll_records)
        if records and not seen:
            started, cpu_started = time.perf_counter(), time.process_time()
        decoder.decode_many(records)
        seen += len(records)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    source.close()
    return {"records_per_s": seen / elapsed, "cores_used": cpu / elapsed}


def train_step_rate(settings: Settings, x: np.ndarray, seconds: float = 5.0) -> dict[str, float]:
    """The compiled step alone, on one resident batch (the first call, with the compile, is timed apart)."""
    trainer = build_trainer(settings)
    batch = settings.training.batch_size
    rows = np.ones((batch, trainer.row_width), dtype=np.float32)  # [x | c | weight 1]
    rows[:, : x.shape[1]] = np.resize(x, (batch, x.shape[1]))
    started = time.perf_counter()
    trainer.train_rows(rows, batch)
    compile_seconds = time.perf_counter() - started
    steps = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        trainer.train_rows(rows, batch)
        steps += 1
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "records_per_s": steps * batch / elapsed,
        "compile_seconds": compile_seconds,
        "steps": steps,
        "cores_used": cpu / elapsed,
    }


def end_to_end(settings: Settings, count: int, broker_pid: int) -> tuple[dict[str, Any], Trainer]:
    """The daemon on ``count`` records, timed (and its CPU split) from the end of its first step."""
    started = time.perf_counter()
    registry = CollectorRegistry()
    daemon = build_daemon(settings, registry)
    built = time.perf_counter()
    trainer = daemon.loop.trainer
    cpu = CpuSplit(broker_pid)  # made here: this thread runs the loop
    first: dict[str, float] = {}
    original_train = trainer.train_rows

    def timed_train(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = original_train(*args, **kwargs)
        if "end" not in first:
            first["end"] = time.perf_counter()
            first["records"] = result.scores.size
            first["step_seconds"] = result.duration_seconds
            cpu.start()
        return result

    original_checkpoint = daemon.loop.run_checkpoint
    last: dict[str, Any] = {}

    def measured() -> int:
        """Records timed: all but the first batch, whose step ends before the clock starts."""
        return count - int(first["records"])

    def timed_checkpoint(reason: str) -> Any:
        # The final commit ends the measurement; the CPU split is read here, while the step thread
        # and the Kafka clients' threads still exist (closing the daemon ends them).
        info = original_checkpoint(reason)
        if reason == "shutdown" and "finished" not in last:
            last["finished"] = time.perf_counter()
            last["cpu"] = cpu.stop(last["finished"] - first["end"], measured())
        return info

    trainer.train_rows = timed_train  # type: ignore[method-assign]
    daemon.loop.run_checkpoint = timed_checkpoint  # type: ignore[method-assign]
    counts = daemon.run(max_records=count)
    assert counts.records_consumed == count == counts.latents_published, counts
    finished = last["finished"]
    figures = {
        "records_per_s": measured() / (finished - first["end"]),
        "cpu": last["cpu"],
        "startup_seconds": built - started,
        "to_first_trained_batch_seconds": first["end"] - started,
        "first_step_seconds": first["step_seconds"],
        "compile_seconds": registry.get_sample_value("streamvi_step_compile_seconds") or 0.0,
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


def bench_settings(
    args: argparse.Namespace, broker: EmbeddedBroker, workdir: Path, fmt: str, *extra: str
) -> Settings:
    settings = load_settings(
        args.config,
        [
            f"kafka.bootstrap_servers={broker.bootstrap_servers}",
            f"input.format={fmt}",
            f"input.dim={args.dim}",
            f"snapshots.dir={workdir / 'snapshots'}",
            *args.set,
            *extra,
        ],
    )
    ensure_topics(settings.kafka)
    return settings


def measure_format(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    """Throughput figures for one input format on a broker of its own (plus the baseline for json)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"streamvi-bench-{fmt}-"))
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        settings = bench_settings(args, broker, workdir, fmt)
        x = payload(1000, args.dim)
        record_bytes = produce(settings, x, args.records, fmt)
        consume = consume_decode_rate(settings, args.records)
        # The step alone is timed before and after the end-to-end run, and the faster of the two is
        # the machine's step rate: on a shared machine one window can run slow and flatter the ratio.
        step_windows = [train_step_rate(settings, x)]
        e2e, daemon_trainer = end_to_end(settings, args.records, broker.pid)
        step_windows.append(train_step_rate(settings, x))
        step = max(step_windows, key=lambda window: window["records_per_s"])
        slowest = min(consume["records_per_s"], step["records_per_s"])
        figures: dict[str, Any] = {
            "record_bytes": record_bytes,
            "end_to_end_records_per_s": round(e2e["records_per_s"], 1),
            "consume_decode_records_per_s": round(consume["records_per_s"], 1),
            "train_step_records_per_s": round(step["records_per_s"], 1),
            "train_step_records_per_s_before_and_after": [round(w["records_per_s"], 1) for w in step_windows],
            "ratio_to_slowest_part": round(e2e["records_per_s"] / slowest, 3),
            "cpu": {
                "end_to_end": e2e["cpu"],
                "consume_decode_cores_used": round(consume["cores_used"], 2),
                "train_step_cores_used": round(step["cores_used"], 2),
            },
            "startup": {
                "to_first_trained_batch_seconds": round(e2e["to_first_trained_batch_seconds"], 2),
                "first_step_seconds": round(e2e["first_step_seconds"], 3),
                "compile_seconds_overlapping_the_join": round(e2e["compile_seconds"], 2),
                "build_daemon_seconds": round(e2e["startup_seconds"], 2),
                "isolated_compile_seconds": round(step["compile_seconds"], 2),
            },
        }
        if fmt == "json" and args.baseline:
            # The baseline steps on polls of BASELINE_BATCH records; the daemon is compared at its own
            # batch size and, for sample efficiency, at the baseline's (same number of updates).
            same_batch = bench_settings(
                args,
                broker,
                workdir,
                fmt,
                f"training.batch_size={BASELINE_BATCH}",
                "kafka.group_id=bench-same-batch",
                f"snapshots.dir={workdir / 'snapshots-same-batch'}",
            )
            e2e_same, same_trainer = end_to_end(same_batch, args.records, broker.pid)
            baseline_rate, baseline_model = run_handwritten(settings, args.records, group="bench-handwritten")
            held = payload(500, args.dim, seed=1)  # same distribution, records neither run has seen
            figures["handwritten"] = {
                "records_per_s": round(baseline_rate, 1),
                "speedup_of_daemon": round(e2e["records_per_s"] / baseline_rate, 2),
                "heldout_elbo_handwritten": round(heldout_elbo(baseline_model, held), 3),
                "heldout_elbo_daemon": round(heldout_elbo(daemon_trainer.model, held), 3),
                f"daemon_at_batch_{BASELINE_BATCH}": {
                    "records_per_s": round(e2e_same["records_per_s"], 1),
                    "speedup": round(e2e_same["records_per_s"] / baseline_rate, 2),
                    "heldout_elbo": round(heldout_elbo(same_trainer.model, held), 3),
                },
            }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--format", choices=["json", "f32", "both"], default="both")
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--config", default=str(ROOT / "bench" / "bench.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="json: also run bench/handwritten.py's loop on the same records and compare",
    )
    parser.add_argument("--startup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--latency-rate", type=float, default=50.0)
    parser.add_argument("--latency-records", type=int, default=1000)
    parser.add_argument("--memory-total", type=int, default=1_000_000, help="0 skips the memory run")
    parser.add_argument("--memory-early", type=int, default=100_000)
    args = parser.parse_args()

    formats = ["json", "f32"] if args.format == "both" else [args.format]
    results: dict[str, Any] = {
        "benchmark": "throughput",
        "config": os.path.relpath(Path(args.config).resolve(), ROOT),
        "overrides": args.set,
        "records": args.records,
    }
    results["formats"] = {fmt: measure_format(args, fmt) for fmt in formats}
    if args.startup:
        workdir = Path(tempfile.mkdtemp(prefix="streamvi-bench-startup-"))
        with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
            settings = bench_settings(args, broker, workdir, formats[0])
            batch = settings.training.batch_size
            produce(settings, payload(1000, args.dim), 30 * batch, formats[0])
            results["startup_of_streamvi_run"] = measure_startup(settings, workdir)
    if args.latency:
        workdir = Path(tempfile.mkdtemp(prefix="streamvi-bench-latency-"))
        with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
            settings = bench_settings(args, broker, workdir, formats[0])
            results["latency"] = measure_latency(settings, args.latency_rate, args.latency_records)
    if args.memory_total:
        workdir = Path(tempfile.mkdtemp(prefix="streamvi-bench-memory-"))
        with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
            settings = bench_settings(args, broker, workdir, "f32")
            results["memory"] = measure_memory(
                settings, args.memory_total, args.memory_early, workdir=workdir
            )
    model_settings = load_settings(args.config, list(args.set))
    results["model"] = "-".join(
        map(str, [args.dim, *model_settings.model.encoder_hidden, model_settings.model.latent_dim])
    )
    results["batch_size"] = model_settings.training.batch_size
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), **versions()}
    print(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
