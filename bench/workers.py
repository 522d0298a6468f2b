"""Trainer workers (``distribution.strategy=multi_worker``): the all-reduce's cost, 1 vs 2 workers.

Prints one JSON object:

- ``step``: the training step of the configured model alone, in worker processes on localhost
  (random binary rows, ``--steps`` timed steps after a warm-up, medians in ms):
  ``single_process_ms`` (the one-process trainer), and per cluster size (1 and 2 workers) the whole
  all-reduced step (``allreduced_step_ms``), its local part only (forward and backward, no
  collective: ``local_part_ms``), the all-reduce of the gradients alone (``allreduce_ms``), the
  ``allreduce_bytes_per_step`` (gradients, loss sum and weight, float32, plus the lockstep round's
  vector) and each worker's cores used;
- ``end_to_end``: ``streamvi run`` on ``--records`` records of an embedded broker, one process
  (``strategy=none``) and two workers sharing the partitions, records trained per second in the
  steady state (from the first trained record to the last, by the workers' /metrics), the CPU each
  process and the broker used, and the rewinds the group made (a rebalance rewinds every worker);
- ``estimate_8_workers``: a step on 8 machines from the measured parts: one worker's local part
  (measured alone, as on a machine of its own) plus the 2-worker all-reduce scaled by a ring
  all-reduce's traffic, 2(N-1)/N of the gradient bytes per worker (1.75 times the 2-worker
  traffic), and its records per second. An estimate, not a measurement: it assumes one worker per
  machine and a network like this machine's loopback, where the 2-worker all-reduce also shares
  the two cores with the other worker;
- ``estimate_8_workers_network``: the same on paper for a real network (``--network-gbps``,
  default 10, and ``--hop-latency-us`` per ring transfer, default 100): one worker's measured step
  without its all-reduce, plus a ring all-reduce of the step's bytes at that line rate.

On a 2-core machine two workers cannot be faster than one: they share the same two cores (with the
broker), so each step takes about as long as one process's step on the union, plus the all-reduce.

Usage: python bench/workers.py [--records N] [--steps N] [--config FILE] [--set SECTION.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, payload, process_cpu_seconds

ROUND_BYTES = 9 * 8  # the lockstep round: 9 float64 values per worker


def _settings(config: str, overrides: list[str]) -> Any:
    from streamvi.config import load_settings

    return load_settings(config, overrides, environ={})


def _rows(settings: Any, seed: int) -> Any:
    import numpy as np

    dim, batch = settings.input.dim, settings.training.batch_size
    rows = np.zeros((batch, dim + settings.input.context_dim + 1), np.float32)
    rows[:, :dim] = payload(batch, dim, seed)
    rows[:, -1] = 1.0
    return rows


def _median_ms(call: Any, steps: int) -> float:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 3)


def step_worker(config: str, overrides: list[str], steps: int) -> dict[str, Any]:
    """One worker of the step measurement (TF_CONFIG from the parent); prints its JSON."""
    import tensorflow as tf

    from streamvi.cluster import resolve_cluster
    from streamvi.training.distributed import build_distributed_trainer, build_strategy

    settings = _settings(config, [*overrides, "distribution.strategy=multi_worker"])
    cluster = resolve_cluster(settings.distribution, os.environ)
    assert cluster is not None
    strategy = build_strategy(cluster)
    trainer = build_distributed_trainer(settings, strategy)
    rows = _rows(settings, cluster.index)
    n = settings.training.batch_size
    trainer.warm_up()
    trainer.sync_from_chief()

    def barrier() -> None:  # every phase starts on all workers together
        trainer.all_reduce([tf.constant(0.0)])[0].numpy()

    barrier()
    cpu_before, wall_before = process_cpu_seconds(), time.perf_counter()
    step_ms = _median_ms(lambda: trainer.train_rows(rows, n), steps)
    cpu = process_cpu_seconds() - cpu_before
    cores = round(cpu / (time.perf_counter() - wall_before), 2)
    tensor = tf.constant(rows)
    barrier()
    with trainer._placement():
        trainer._local_fn(tensor)
        local_ms = _median_ms(lambda: [t.numpy() for t in tf.nest.flatten(trainer._local_fn(tensor))], steps)
    grads = [tf.zeros_like(v) for v in trainer.trainable_variables]
    scalars = [tf.constant(0.0), tf.constant(0.0)]
    trainer.all_reduce([*scalars, *grads])
    barrier()
    reduce_ms = _median_ms(lambda: [t.numpy() for t in trainer.all_reduce([*scalars, *grads])], steps)
    gradient_bytes = sum(int(v.shape.num_elements()) * 4 for v in trainer.trainable_variables) + 8
    return {
        "allreduced_step_ms": step_ms,
        "local_part_ms": local_ms,
        "allreduce_ms": reduce_ms,
        "allreduce_bytes_per_step": gradient_bytes + ROUND_BYTES,
        "cores_used_during_steps": cores,
    }


def single_process(config: str, overrides: list[str], steps: int) -> float:
    from streamvi.runtime import build_trainer

    settings = _settings(config, overrides)
    trainer = build_trainer(settings)
    rows = _rows(settings, 0)
    trainer.warm_up()
    return _median_ms(lambda: trainer.train_rows(rows, settings.training.batch_size), steps)


def cluster_steps(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    from streamvi.io.embedded import free_port

    addresses = [f"127.0.0.1:{free_port()}" for _ in range(workers)]
    processes = []
    for index in range(workers):
        tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2"}
        command = [
            sys.executable,
            __file__,
            "--step-worker",
            "--steps",
            str(args.steps),
            "--config",
            args.config,
        ]
        command += [f"--set={item}" for item in args.set]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        )
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=1800)
        if process.returncode != 0:
            raise RuntimeError(f"a step worker failed with status {process.returncode}")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    keys = ("allreduced_step_ms", "local_part_ms", "allreduce_ms")
    merged: dict[str, Any] = {key: max(r[key] for r in results) for key in keys}  # the slowest worker paces
    merged["allreduce_bytes_per_step"] = results[0]["allreduce_bytes_per_step"]
    merged["cores_used_per_worker"] = [r["cores_used_during_steps"] for r in results]
    return merged


def trained(process: Any) -> float:
    return process.sample("streamvi_records_trained_total")


def end_to_end(args: argparse.Namespace, workers: int, broker: Any, workdir: Path) -> dict[str, Any]:
    """``streamvi run`` (one process, or ``workers`` workers) over every record, from the start."""
    from streamvi.io.embedded import free_port
    from tests.integration.faultkit import DaemonProcess

    group = f"bench-workers-{workers}"
    addresses = ", ".join(f"127.0.0.1:{free_port()}" for _ in range(workers))
    processes = []
    for index in range(workers):
        cluster = (
            [
                "distribution.strategy=multi_worker",
                f"distribution.workers=[{addresses}]",
                f"distribution.worker_index={index}",
            ]
            if workers > 1
            else []
        )
        settings = _settings(
            args.config,
            [
                f"kafka.bootstrap_servers={broker.bootstrap_servers}",
                f"kafka.topic_partitions={args.partitions}",
                f"kafka.group_id={group}",
                "input.format=f32",
                f"input.dim={args.dim}",
                f"snapshots.dir={workdir / group}",
                "metrics.port=0",
                # every record is trained on (flagged ones too), so the trained count reaches --records
                "anomaly.train_on_flagged=true",
                *args.set,
                *cluster,
            ],
        )
        processes.append(DaemonProcess(settings, workdir / f"{group}-{index}.log", "--idle-timeout", "5"))
    for process in processes:
        process.wait_for_metrics(600)
    while sum(trained(p) for p in processes) == 0:
        time.sleep(0.05)
    started = time.perf_counter()
    cpu = [process_cpu_seconds(p.process.pid) for p in processes]
    broker_cpu = process_cpu_seconds(broker.pid)
    while sum(trained(p) for p in processes) < args.records:
        if any(p.process.poll() is not None for p in processes):
            raise RuntimeError(f"a trainer stopped early:\n{processes[0].log_text()[-2000:]}")
        time.sleep(0.05)
    wall = time.perf_counter() - started
    cores = [
        round((process_cpu_seconds(p.process.pid) - c) / wall, 2) for p, c in zip(processes, cpu, strict=True)
    ]
    broker_cores = round((process_cpu_seconds(broker.pid) - broker_cpu) / wall, 2)
    for process in processes:
        if process.wait(600) != 0:
            raise RuntimeError(f"a trainer failed:\n{process.log_text()[-3000:]}")
    rewinds = sum(p.log_text().count("rewinding") for p in processes)
    return {
        "records_per_s": round(args.records / wall, 1),
        "cores_used_per_process": cores,
        "broker_cores_used": broker_cores,
        "rewinds": rewinds,
    }


def estimate(step: dict[str, Any], batch: int, workers: int = 8) -> dict[str, Any]:
    traffic = (2 * (workers - 1) / workers) / (2 * (2 - 1) / 2)
    step_ms = step["workers_1"]["local_part_ms"] + step["workers_2"]["allreduce_ms"] * traffic
    return _scaled(step, batch, workers, step_ms)


def network_estimate(
    step: dict[str, Any], batch: int, gbps: float, hop_latency_us: float, workers: int = 8
) -> dict[str, Any]:
    """A step on ``workers`` machines joined by a ``gbps`` network, on paper: one worker's step
    without its all-reduce (forward, backward and update, measured with 1 worker) plus a ring
    all-reduce of the step's bytes, 2(N-1) transfers of bytes/N each at line rate and
    ``hop_latency_us`` each. Compute and communication do not overlap (one all-reduce after the
    backward pass), so the sum is the step."""
    one = step["workers_1"]
    compute_ms = one["allreduced_step_ms"] - one["allreduce_ms"]
    size = one["allreduce_bytes_per_step"]
    transfer_ms = 2 * (workers - 1) / workers * size / (gbps * 1e9 / 8) * 1000
    latency_ms = 2 * (workers - 1) * hop_latency_us / 1000
    step_ms = compute_ms + transfer_ms + latency_ms
    return {
        "network_gbps": gbps,
        "hop_latency_us": hop_latency_us,
        "compute_ms": round(compute_ms, 3),
        "allreduce_ms": round(transfer_ms + latency_ms, 3),
        **_scaled(step, batch, workers, step_ms),
    }


def _scaled(step: dict[str, Any], batch: int, workers: int, step_ms: float) -> dict[str, Any]:
    return {
        "workers": workers,
        "step_ms": round(step_ms, 3),
        "records_per_s": round(workers * batch / (step_ms / 1000), 1),
        "against_one_process": round(workers * step["single_process_ms"] / step_ms, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--config", default=str(ROOT / "bench" / "bench.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--network-gbps", type=float, default=10.0, help="for the paper estimate")
    parser.add_argument("--hop-latency-us", type=float, default=100.0, help="for the paper estimate")
    parser.add_argument("--step-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.set = [f"input.dim={args.dim}", *args.set]
    if args.step_worker:
        print(json.dumps(step_worker(args.config, args.set, args.steps)))
        return
    from common import produce

    from streamvi.io.admin import ensure_topics
    from streamvi.io.embedded import EmbeddedBroker
    from streamvi.runtime import versions

    step: dict[str, Any] = {"single_process_ms": single_process(args.config, args.set, args.steps)}
    for workers in (1, 2):
        step[f"workers_{workers}"] = cluster_steps(args, workers)
    step["allreduce_share_of_2_worker_step"] = round(
        step["workers_2"]["allreduce_ms"] / step["workers_2"]["allreduced_step_ms"], 3
    )
    workdir = Path(tempfile.mkdtemp(prefix="streamvi-bench-workers-"))
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        settings = _settings(
            args.config,
            [
                f"kafka.bootstrap_servers={broker.bootstrap_servers}",
                f"kafka.topic_partitions={args.partitions}",
                "input.format=f32",
                *args.set,
            ],
        )
        ensure_topics(settings.kafka)
        produce(settings, payload(1000, args.dim), args.records, "f32")
        one = end_to_end(args, 1, broker, workdir)
        two = end_to_end(args, 2, broker, workdir)
    batch = _settings(args.config, args.set).training.batch_size
    results = {
        "benchmark": "workers",
        "config": os.path.relpath(Path(args.config).resolve(), ROOT),
        "overrides": args.set,
        "records": args.records,
        "step": step,
        "end_to_end": {
            "one_process": one,
            "two_workers": {**two, "ratio_to_one": round(two["records_per_s"] / one["records_per_s"], 3)},
        },
        "estimate_8_workers": estimate(step, batch),
        "estimate_8_workers_network": network_estimate(step, batch, args.network_gbps, args.hop_latency_us),
        "machine": {"cpus": os.cpu_count(), **versions()},
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
