"""Fault-injection harness shared by the fault tests and bench/faults.py.

Input records carry sequence numbers in their ids (``seq-00000042``); the daemon runs as a real
subprocess (``python -m streamvi.cli.main run``) configured through STREAMVI_* variables, is killed
at random moments, restarted, and finally the outputs are read back and checked for lost and
duplicated records.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaConsumer, TopicPartition

from streamvi.config import Settings
from streamvi.datasets import encode_record, load_digits
from streamvi.snapshots import SnapshotStore
from tests.integration.conftest import committed_offsets
from tests.integration.conftest import produce_values as produce

STREAMVI = [sys.executable, "-m", "streamvi.cli.main"]
ROOT = Path(__file__).resolve().parents[2]


def seq_id(i: int) -> str:
    return f"seq-{i:08d}"


def sequenced_records(start: int, count: int) -> list[tuple[bytes, bytes]]:
    data = load_digits()
    return [
        (seq_id(i).encode(), encode_record(data.x[i % len(data)], seq_id(i), "json"))
        for i in range(start, start + count)
    ]


def read_all(
    bootstrap: str,
    topic: str,
    *,
    read_committed: bool = False,
    expected: int | None = None,
    quiet_seconds: float = 2.0,
    timeout: float = 60.0,
) -> list[Any]:
    """Every message of ``topic`` from the start: until ``expected`` arrived (then a little more, to
    let duplicates show) or, without ``expected``, until nothing came for ``quiet_seconds``."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
    )
    try:
        deadline = time.monotonic() + timeout
        partitions = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                time.sleep(0.2)
        if not partitions:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        messages: list[Any] = []
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            got = [m for batch in consumer.poll(timeout_ms=300).values() for m in batch]
            messages.extend(got)
            now = time.monotonic()
            if got:
                last_new = now
            if expected is not None and len(messages) >= expected and now - last_new > 0.5:
                break
            if now - last_new > quiet_seconds and (expected is None or len(messages) >= expected):
                break
        return messages
    finally:
        consumer.close()


def read_committed_emulated(bootstrap: str, topic: str, expected: int | None = None) -> list[Any]:
    """What a read_committed consumer sees, worked out on the client from the transaction markers.

    The embedded broker (Tansu) writes commit/abort markers but sends no aborted-transaction index
    in fetch responses, so kafka-python's read_committed returns aborted records too. A data record
    of producer P is committed iff the first marker of P after it is a COMMIT; with no marker after
    it, its transaction is still open (invisible). Non-transactional records are always visible.
    """
    from kafka.consumer import fetcher

    # (partition, offset, producer id, transactional, abort?): offsets are per partition
    batches: list[tuple[int, int, int, bool, bool | None]] = []
    original = fetcher.Fetcher.PartitionRecords.__init__

    def spy(self: Any, fetch_offset: int, tp: Any, records: Any, *args: Any, **kwargs: Any) -> None:
        from kafka.record import MemoryRecords

        copy = MemoryRecords(bytes(records._buffer))
        batch = copy.next_batch()
        while batch is not None:
            if batch.magic == 2:
                abort = next(iter(batch)).abort if batch.is_control_batch else None
                batches.append(
                    (tp.partition, batch.base_offset, batch.producer_id, batch.is_transactional, abort)
                )
            batch = copy.next_batch()
        original(self, fetch_offset, tp, records, *args, **kwargs)

    fetcher.Fetcher.PartitionRecords.__init__ = spy
    try:
        messages = read_all(bootstrap, topic, expected=expected)
    finally:
        fetcher.Fetcher.PartitionRecords.__init__ = original
    markers: dict[tuple[int, int], list[tuple[int, bool]]] = {}  # (partition, producer) -> markers
    data: dict[int, dict[int, tuple[int, bool]]] = {}  # partition -> base offset -> (producer, transactional)
    for partition, offset, producer, transactional, abort in sorted(set(batches), key=lambda b: b[:2]):
        if abort is None:
            data.setdefault(partition, {})[offset] = (producer, transactional)
        else:
            markers.setdefault((partition, producer), []).append((offset, abort))
    base_offsets = {partition: sorted(offsets) for partition, offsets in data.items()}

    def visible(partition: int, offset: int) -> bool:
        import bisect

        bases = base_offsets[partition]
        base = bases[bisect.bisect_right(bases, offset) - 1]
        producer, transactional = data[partition][base]
        if not transactional:
            return True
        later = [abort for marker, abort in markers.get((partition, producer), []) if marker > offset]
        return bool(later) and not later[0]

    return [m for m in messages if visible(m.partition, m.offset)]


def cli_env(settings: Settings) -> dict[str, str]:
    """The settings as STREAMVI_* environment variables, as a container would pass them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMVI_")}
    for section, values in settings.public_dict().items():
        for key, value in values.items():
            if value is None:
                continue
            text = json.dumps(value) if isinstance(value, list | bool) else str(value)
            env[f"STREAMVI_{section.upper()}__{key.upper()}"] = text
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class DaemonProcess:
    """``streamvi run`` (or another ``command``, e.g. ``serve``) as a subprocess, stderr to a log
    file, /metrics scraped for progress."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        *args: str,
        command: str = "run",
        fault_hooks: dict[str, str] | None = None,
    ) -> None:
        """``fault_hooks``: environment for tests/integration/fault_hooks/sitecustomize.py, which
        is then loaded into the subprocess (e.g. ``{"FAULT_COMMIT_FAILS_AT": "2"}``)."""
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 -- closed in wait()
        env = cli_env(settings)
        if fault_hooks:
            env.update(fault_hooks)
            env["PYTHONPATH"] = str(Path(__file__).parent / "fault_hooks") + os.pathsep + env["PYTHONPATH"]
        self.process = subprocess.Popen([*STREAMVI, command, *args], env=env, stderr=self._log, cwd=ROOT)
        self.metrics_url: str | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_metrics(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while self.metrics_url is None:
            for line in self.log_text().splitlines():
                if line.startswith("metrics: "):
                    self.metrics_url = line.split(" ", 1)[1].strip()
            if self.metrics_url is None:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"daemon never served /metrics:\n{self.log_text()[-3000:]}")
                time.sleep(0.1)
        return self.metrics_url

    def sample(self, name: str) -> float:
        """One sample from /metrics, e.g. ``streamvi_model_step`` or
        ``streamvi_dead_letters_total{reason="bad_json"}`` (0 when the daemon is not answering)."""
        assert self.metrics_url is not None
        try:
            body = urllib.request.urlopen(self.metrics_url, timeout=2).read().decode()
        except OSError:
            return 0.0
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_for(self, name: str, at_least: float, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.sample(name)
            if value >= at_least or self.process.poll() is not None:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} stayed at {value} < {at_least}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 120.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log.close()


@dataclass
class KillReport:
    guarantee: str
    records: int
    kills: int
    restarts: int = 0
    lost: int = 0
    duplicates: int = 0
    max_duplicates_allowed: int = 0
    outputs: int = 0
    snapshot_records_trained: int = 0
    committed_offset: int = 0
    snapshot_offset: int = 0
    corrupt_outputs: int = 0
    kill_after_records: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def run_kill_scenario(
    settings: Settings,
    records: int,
    kills: int,
    seed: int,
    workdir: Path,
    *,
    max_kill_delay: float = 1.5,
    feed_batches: int = 1,
) -> KillReport:
    """Produce ``records`` sequenced records, SIGKILL the daemon ``kills`` times at random moments
    while it works, then let a last instance finish (idle timeout) and check the outputs."""
    rng = random.Random(seed)
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    exactly_once = settings.processing.guarantee == "exactly_once"
    started = time.monotonic()
    report = KillReport(settings.processing.guarantee, records, kills)
    # Feed in slices so that kills also land while the input is still arriving.
    chunks = [records * k // feed_batches for k in range(feed_batches + 1)]
    fed = 0
    produce(bootstrap, kafka.input_topic, sequenced_records(0, chunks[1]))
    fed = 1
    partition = (kafka.input_topic, 0)

    def resume_offset() -> int:
        """Where the next instance starts: the group's offset (exactly-once) or the newest snapshot's."""
        latest = SnapshotStore(settings.snapshots.dir).latest()
        offset = committed_offsets(bootstrap, kafka.group_id).get(partition, 0)
        if not exactly_once and latest is not None:
            offset = latest.offsets.get(partition, offset)
        return offset

    for kill in range(kills):
        if resume_offset() >= chunks[fed]:
            # A fast instance finished all the input fed so far before its kill: feed the next
            # slice, or stop killing when there is none (a new instance would have nothing to do).
            if fed == feed_batches:
                break
            produce(
                bootstrap, kafka.input_topic, sequenced_records(chunks[fed], chunks[fed + 1] - chunks[fed])
            )
            fed += 1
        daemon = DaemonProcess(settings, workdir / f"daemon-{kill}.log")
        report.restarts += 1
        try:
            daemon.wait_for_metrics()
            # wait until this instance is training (past the XLA compile), then kill it a random
            # moment later: mid-batch, mid-snapshot, between snapshot and commit...
            daemon.wait_for("streamvi_train_steps_total", 1, timeout=120)
            time.sleep(rng.uniform(0.0, max_kill_delay))
            report.kill_after_records.append(int(daemon.sample("streamvi_records_consumed_total")))
            daemon.signal(signal.SIGKILL)
        finally:
            daemon.wait()
        if fed < feed_batches and rng.random() < 0.5:
            produce(
                bootstrap, kafka.input_topic, sequenced_records(chunks[fed], chunks[fed + 1] - chunks[fed])
            )
            fed += 1
    while fed < feed_batches:
        produce(bootstrap, kafka.input_topic, sequenced_records(chunks[fed], chunks[fed + 1] - chunks[fed]))
        fed += 1
    # The last instance resumes where the group (exactly-once) or the newest snapshot
    # (at-least-once) says, and stops cleanly once it has consumed the rest.
    resume = resume_offset()
    if resume < records:
        final = DaemonProcess(settings, workdir / "daemon-final.log", "--max-records", str(records - resume))
        report.restarts += 1
        code = final.wait(timeout=600)
        if code != 0:
            raise AssertionError(f"final daemon exited {code}:\n{final.log_text()[-3000:]}")

    if exactly_once:
        latents = read_committed_emulated(bootstrap, kafka.latents_topic, expected=records)
    else:
        latents = read_all(bootstrap, kafka.latents_topic, expected=records)
    ids: Counter[str] = Counter()
    for message in latents:
        try:
            ids[orjson.loads(message.value)["id"]] += 1
        except (ValueError, KeyError, TypeError):
            report.corrupt_outputs += 1
    wanted = {seq_id(i) for i in range(records)}
    report.outputs = len(latents)
    report.lost = len(wanted - set(ids))
    report.duplicates = sum(count - 1 for count in ids.values())
    interval = (settings.snapshots.every_steps + 1) * settings.training.batch_size
    report.kills = len(report.kill_after_records)  # the kills that happened (fewer if input ran out)
    report.max_duplicates_allowed = 0 if exactly_once else report.kills * (interval + kafka.max_poll_records)
    snapshot = SnapshotStore(settings.snapshots.dir).latest()
    assert snapshot is not None
    report.snapshot_records_trained = int(snapshot.meta["counts"]["records_trained"])
    report.snapshot_offset = snapshot.offsets.get(partition, 0)
    report.committed_offset = committed_offsets(bootstrap, kafka.group_id).get(partition, 0)
    report.seconds = round(time.monotonic() - started, 1)
    return report


def fault_overrides(guarantee: str) -> list[str]:
    """Small model, small batches and frequent snapshots: many crash windows per second."""
    return [
        f"processing.guarantee={guarantee}",
        "kafka.session_timeout_ms=3000",
        "kafka.heartbeat_interval_ms=500",
        "kafka.max_poll_records=64",
        "model.latent_dim=4",
        "model.encoder_hidden=[32]",
        "training.batch_size=16",
        "training.max_batch_latency_ms=50",
        "snapshots.every_steps=2",
        "snapshots.keep=3",
    ]
