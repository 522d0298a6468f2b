"""Helpers the benchmarks share: the MNIST-like payload, a fast producer, per-thread CPU time."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from kafka import KafkaProducer

from streamvi.config import Settings
from streamvi.datasets import encode_record

ROOT = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK")


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
    """Append ``count`` records (cycling through the rows of ``x``) to the input topic; return one's size."""
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


def thread_cpu_seconds(pid: int | str = "self") -> dict[int, float]:
    """User + system CPU seconds of every thread of a process, by native thread id (Linux /proc)."""
    seconds: dict[int, float] = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / _TICKS
    return seconds


def _native_name(tid: int) -> str:
    """The kernel's name of a thread of this process (librdkafka names its threads ``rdk:*``)."""
    try:
        with open(f"/proc/self/task/{tid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


def process_cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a whole process."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class CpuSplit:
    """CPU used between ``start()`` and ``stop()``: the loop thread (the caller's), the training step
    (its thread and the native threads of TensorFlow's pools), the Kafka clients (kafka-python's I/O
    thread or librdkafka's ``rdk:`` threads) with the other Python threads (metrics server) and, if
    given, the broker process."""

    def __init__(self, broker_pid: int | None = None) -> None:
        self.broker_pid = broker_pid
        self.loop_tid = threading.get_native_id()
        self._start: dict[int, float] = {}
        self._process_start = 0.0
        self._broker_start = 0.0
        self._names: dict[int, str] = {}

    def _remember_names(self) -> None:
        self._names.update({t.native_id: t.name for t in threading.enumerate() if t.native_id is not None})

    def start(self) -> None:
        self._remember_names()
        self._start = thread_cpu_seconds()
        self._process_start = process_cpu_seconds()
        self._broker_start = process_cpu_seconds(self.broker_pid) if self.broker_pid else 0.0

    def stop(self, wall_seconds: float, records: int) -> dict[str, float]:
        self._remember_names()
        now = thread_cpu_seconds()
        groups = {"loop_thread": 0.0, "training": 0.0, "kafka_clients_and_other": 0.0}
        for tid, seconds in now.items():
            used = seconds - self._start.get(tid, 0.0)
            name = self._names.get(tid)
            if tid == self.loop_tid:
                groups["loop_thread"] += used
            elif name is None and _native_name(tid).startswith("rdk:"):
                groups["kafka_clients_and_other"] += used  # librdkafka's own threads
            elif name is None or name.startswith("streamvi-step"):
                groups["training"] += used
            else:
                groups["kafka_clients_and_other"] += used
        if self.broker_pid:
            groups["broker"] = process_cpu_seconds(self.broker_pid) - self._broker_start
        split: dict[str, float] = {}
        for group, used in groups.items():
            split[f"{group}_us_per_record"] = round(used / records * 1e6, 1)
        split["cores_used"] = round(sum(groups.values()) / wall_seconds, 2)
        # Threads that ended in between are missing from the split; the process total has them.
        process = process_cpu_seconds() - self._process_start + groups.get("broker", 0.0)
        split["cores_used_all_threads"] = round(process / wall_seconds, 2)
        return split
