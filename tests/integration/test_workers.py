"""Trainer workers against the real (embedded) broker: two ``streamvi run`` processes train one
model in lockstep over MultiWorkerMirroredStrategy on localhost, sharing a 2-partition topic and
one snapshot store. After the run both hold the same parameters (checksums in their logs), and
every record was trained exactly once: trained count = snapshot offsets = committed offsets =
records."""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer

from streamvi.datasets import encode_record, load_digits
from streamvi.io.admin import ensure_topics
from streamvi.io.embedded import free_port
from streamvi.snapshots import SnapshotStore
from streamvi.snapshots.loading import load_trainer
from tests.integration.faultkit import (
    DaemonProcess,
    committed_offsets,
    produce,
    read_committed_emulated,
    seq_id,
    sequenced_records,
)
from tests.unit import feature_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKERS = 2
CHECKSUM = re.compile(r"worker (\d+) of \d+: step (\d+), parameter checksum ([0-9a-f]{64})")


def worker_overrides() -> list[str]:
    return [
        "kafka.topic_partitions=2",
        "kafka.session_timeout_ms=6000",
        "kafka.heartbeat_interval_ms=500",
        "kafka.max_poll_records=200",
        "model.encoder_hidden=[32]",
        "snapshots.every_steps=20",
        "distribution.strategy=multi_worker",
        "distribution.collective_timeout_seconds=30",
    ]


def start_workers(
    settings_factory,
    tmp_path: Path,
    *args: str,
    overrides: tuple[str, ...] = (),
    fault_hooks: dict[int, dict[str, str]] | None = None,
) -> tuple[list[DaemonProcess], object]:
    """The workers as ``streamvi run`` subprocesses; ``fault_hooks``: per worker index, the faults
    tests/integration/fault_hooks injects into it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    addresses = ", ".join(f"127.0.0.1:{free_port()}" for _ in range(WORKERS))
    processes = []
    settings = None
    for index in range(WORKERS):
        settings = settings_factory(
            *worker_overrides(),
            *overrides,
            f"distribution.workers=[{addresses}]",
            f"distribution.worker_index={index}",
        )
        hooks = (fault_hooks or {}).get(index)
        processes.append(DaemonProcess(settings, tmp_path / f"worker-{index}.log", *args, fault_hooks=hooks))
    return processes, settings


def feed(settings, records: int):
    """Create the topics and produce ``records`` sequenced records to the input; the Kafka settings."""
    kafka = settings.kafka
    ensure_topics(kafka)
    produce(kafka.bootstrap_servers[0], kafka.input_topic, sequenced_records(0, records))
    return kafka


def finished(processes: list[DaemonProcess]) -> list[tuple[int, str]]:
    """(step, checksum) each worker logged as it stopped, in worker order."""
    ends = []
    for process in processes:
        assert process.wait(600) == 0, process.log_text()[-4000:]
        matches = CHECKSUM.findall(process.log_text())
        assert matches, process.log_text()[-3000:]
        ends.append((int(matches[-1][1]), matches[-1][2]))
    return ends


def check_exactly_once(settings, records: int) -> dict:
    """The newest snapshot covers every record once, and the group committed the same offsets."""
    latest = SnapshotStore(settings.snapshots.dir).latest()
    assert latest is not None
    assert sum(latest.offsets.values()) == records, latest.offsets
    committed = committed_offsets(settings.kafka.bootstrap_servers[0], settings.kafka.group_id)
    assert committed == latest.offsets
    counts = latest.meta["counts"]
    # consumed may exceed it: records fetched in an interval a rebalance rewound are read again
    assert counts["records_trained"] == records <= counts["records_consumed"], counts
    per_worker = latest.meta["worker_counts"]
    assert sum(w["records_trained"] for w in per_worker) == records
    return latest.meta


def test_two_workers_train_one_model_on_every_record_once(settings_factory, tmp_path):
    processes, settings = start_workers(settings_factory, tmp_path, "--idle-timeout", "5")
    records = 3000
    feed(settings, records)
    ends = finished(processes)
    assert ends[0] == ends[1] and ends[0][0] > 0, ends  # the same step and parameters on both
    meta = check_exactly_once(settings, records)
    # both partitions hold records (keyed by sequence): each worker trained its share
    assert all(w["records_trained"] > 0 for w in meta["worker_counts"]), meta["worker_counts"]
    print(f"\nsteps {ends[0][0]}, per worker {[w['records_trained'] for w in meta['worker_counts']]}")


def test_two_workers_share_the_online_normaliser_of_feature_events(settings_factory, tmp_path):
    """Named-field events with missing values, standardised online: the normaliser folds both
    workers' records, so it is part of the equal checksums, and the snapshot's moments are those of
    every record trained (each observed value once)."""
    events = feature_events.events(seed=3) + feature_events.events(seed=4)
    schema = orjson.dumps(feature_events.schema()).decode()
    overrides = (f"input.features={schema}", "input.normalise_warmup=64", "training.batch_size=32")
    processes, settings = start_workers(
        settings_factory, tmp_path, "--idle-timeout", "5", overrides=overrides
    )
    kafka = settings.kafka
    ensure_topics(kafka)
    keyed = [(f"{e['id']}-{i}".encode(), orjson.dumps(e)) for i, e in enumerate(events)]
    produce(kafka.bootstrap_servers[0], kafka.input_topic, keyed)
    ends = finished(processes)
    assert ends[0] == ends[1] and ends[0][0] > 0, ends
    meta = check_exactly_once(settings, len(events))
    assert all(w["records_trained"] > 0 for w in meta["worker_counts"]), meta["worker_counts"]
    latest = SnapshotStore(settings.snapshots.dir).latest()
    assert latest is not None
    _, trainer = load_trainer(latest)
    normaliser = trainer.model.inputs.normaliser
    values = np.array(
        [
            [
                e.get(path.split(".")[0], {}).get(path.split(".")[1], np.nan)
                for path in feature_events.feature_paths()
            ]
            for e in events
        ],
        dtype=np.float32,
    ).astype(np.float64)
    assert int(normaliser.records.numpy()) == len(events)
    np.testing.assert_array_equal(normaliser.count.numpy(), (~np.isnan(values)).sum(axis=0))
    np.testing.assert_allclose(normaliser.mean.numpy(), np.nanmean(values, axis=0), rtol=1e-9)
    np.testing.assert_allclose(normaliser.variance().numpy(), np.nanvar(values, axis=0), rtol=1e-9)


DRIFT = re.compile(r"drift detected in the reference scores at step (\d+)")
RAISED = re.compile(r"drift response: learning rate \S+ for \d+ steps")


def test_a_drift_found_by_one_worker_is_answered_by_both_and_the_parameters_stay_equal(
    settings_factory, tmp_path
):
    """Digits, then the same digits inverted (1 - x): a worker's detector finds the fall, the next
    round tells every worker, and both raise the learning rate before the same step and put it back
    after the same number of the union's steps, so the checksums stay equal."""
    overrides = (
        "anomaly.drift_response=raise_learning_rate",
        "anomaly.learning_rate_steps=10",
        "anomaly.drift_warmup_records=300",
        "anomaly.train_on_flagged=true",  # every record trained: exact counts
    )
    processes, settings = start_workers(
        settings_factory, tmp_path, "--idle-timeout", "5", overrides=overrides
    )
    kafka = settings.kafka
    ensure_topics(kafka)
    digits = load_digits().x
    records = 6000
    stream = [
        (
            seq_id(i).encode(),
            encode_record(
                digits[i % len(digits)] if i < 3000 else 1 - digits[i % len(digits)], seq_id(i), "json"
            ),
        )
        for i in range(records)
    ]
    produce(kafka.bootstrap_servers[0], kafka.input_topic, stream)
    ends = finished(processes)
    assert ends[0] == ends[1], ends  # the optimizer changed identically on both
    check_exactly_once(settings, records)
    logs = [p.log_text() for p in processes]
    drifts = [DRIFT.findall(text) for text in logs]
    assert drifts[0] and drifts[0] == drifts[1], drifts  # the same drifts, at the same steps
    for text in logs:
        assert len(RAISED.findall(text)) == len(drifts[0]), text[-3000:]
        assert "learning rate back to" in text
    print(f"\ndrifts answered at steps {drifts[0]} of {ends[0][0]}")


def test_a_worker_whose_partition_stays_empty_does_not_block_training(settings_factory, tmp_path):
    processes, settings = start_workers(settings_factory, tmp_path, "--idle-timeout", "5")
    kafka = settings.kafka
    ensure_topics(kafka)
    records = 1500
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    for key, value in sequenced_records(0, records):
        producer.send(kafka.input_topic, value=value, key=key, partition=0)
    producer.flush()
    producer.close()
    ends = finished(processes)
    assert ends[0] == ends[1] and ends[0][0] >= records // 32, ends
    meta = check_exactly_once(settings, records)
    trained = sorted(w["records_trained"] for w in meta["worker_counts"])
    assert trained == [0, records], meta["worker_counts"]  # the idle worker took part with empty batches


def test_a_killed_worker_fails_the_other_within_the_timeout_and_the_restarted_group_loses_nothing(
    settings_factory, tmp_path
):
    processes, settings = start_workers(settings_factory, tmp_path / "first")
    records = 3000
    feed(settings, records)
    chief, victim = processes
    chief.wait_for_metrics()
    chief.wait_for("streamvi_snapshots_total", 2, timeout=300)  # mid-run, past a group snapshot
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert victim.wait(30) == -signal.SIGKILL
    code = chief.wait(120)
    noticed = time.monotonic() - killed_at
    assert code not in (0, None), chief.log_text()[-3000:]  # the collective failed: not a clean stop
    assert "a collective with the other trainer workers failed" in chief.log_text()
    assert noticed < 30 + 60, noticed  # the collective timeout, plus the exit
    before = SnapshotStore(settings.snapshots.dir).latest()
    assert before is not None and sum(before.offsets.values()) < records  # it did stop mid-stream
    restarted, _ = start_workers(settings_factory, tmp_path / "second", "--idle-timeout", "5")
    ends = finished(restarted)
    assert ends[0] == ends[1], ends
    check_exactly_once(settings, records)  # restored everywhere, resumed at the snapshot's offsets
    print(f"\nthe survivor noticed in {noticed:.1f}s; resumed from step {before.step}")


def test_a_sigterm_to_one_worker_under_load_stops_the_group_at_a_joint_checkpoint(settings_factory, tmp_path):
    """What a rolling restart does: SIGTERM to one worker while records flow. The stop travels in
    the next lockstep round, so both workers write one final snapshot and exit cleanly, well inside
    the collective timeout; the restarted group trains the rest, each record once."""
    processes, settings = start_workers(settings_factory, tmp_path / "first")
    records = 6000
    feed(settings, records)
    chief, other = processes
    chief.wait_for_metrics()
    chief.wait_for("streamvi_records_trained_total", 1000, timeout=300)
    other.signal(signal.SIGTERM)
    signalled = time.monotonic()
    codes = [other.wait(120), chief.wait(120)]
    stopped = time.monotonic() - signalled
    assert codes == [0, 0], (codes, other.log_text()[-3000:], chief.log_text()[-3000:])
    assert stopped < 30, stopped  # not the collective timeout (30 s) or the shutdown grace
    ends = [CHECKSUM.findall(p.log_text())[-1] for p in processes]
    assert ends[0][1:] == ends[1][1:], ends  # the same final step and parameters
    final = SnapshotStore(settings.snapshots.dir).latest()
    assert final is not None and final.step == int(ends[0][1])  # the joint final checkpoint
    assert sum(final.offsets.values()) < records  # it did stop mid-stream
    # The restart joins under another group id: after every member of a group has left cleanly,
    # the embedded broker (Tansu 0.6) can keep a departed member as the group's leader, so a group
    # restarted at once under the same id may wait for its assignment for good (seen here; a Kafka
    # broker elects a leader among the members that join). The snapshot holds the offsets.
    restarted, again = start_workers(
        settings_factory,
        tmp_path / "second",
        "--idle-timeout",
        "5",
        overrides=(f"kafka.group_id={settings.kafka.group_id}-restarted",),
    )
    ends = finished(restarted)
    assert ends[0] == ends[1], ends
    check_exactly_once(again, records)
    print(f"\nthe group stopped {stopped:.1f}s after the SIGTERM, at step {final.step}")


def test_a_rebalance_mid_run_rewinds_every_worker_together_and_trains_nothing_twice(
    settings_factory, tmp_path
):
    processes, settings = start_workers(settings_factory, tmp_path, "--idle-timeout", "6")
    records = 6000
    kafka = feed(settings, records)
    processes[0].wait_for_metrics()
    processes[0].wait_for("streamvi_records_trained_total", 300, timeout=300)
    # another member joins the group (and leaves without committing): partitions move twice
    intruder = KafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=kafka.group_id,
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    intruder.subscribe([kafka.input_topic])
    deadline = time.monotonic() + 20
    while not intruder.assignment() and time.monotonic() < deadline:
        intruder.poll(timeout_ms=200, max_records=1)
    assert intruder.assignment(), "the extra member never got a partition"
    intruder.close(autocommit=False)
    ends = finished(processes)
    assert ends[0] == ends[1], ends
    check_exactly_once(settings, records)
    logs = [p.log_text() for p in processes]
    assert all("revoked by a rebalance" in text or "another worker rewinds" in text for text in logs)
    # a rebalance is routine: its rewinds are warnings, not errors
    rewinds = [line for text in logs for line in text.splitlines() if "rewinding to" in line]
    assert rewinds and all(" WARNING streamvi.stream.recovery: " in line for line in rewinds), rewinds


EXACTLY_ONCE = ("processing.guarantee=exactly_once",)


def check_latents_exactly_once(settings, records: int) -> None:
    """What a read_committed consumer of the latents topic sees: every record once."""
    kafka = settings.kafka
    messages = read_committed_emulated(kafka.bootstrap_servers[0], kafka.latents_topic, expected=records)
    ids = Counter(orjson.loads(m.value)["id"] for m in messages)
    assert sorted(ids) == sorted(seq_id(i) for i in range(records)), len(ids)
    assert set(ids.values()) == {1}, [i for i, n in ids.items() if n > 1][:10]


def test_exactly_once_workers_a_failed_commit_of_one_rewinds_all_and_withholds_what_the_other_committed(
    settings_factory, tmp_path
):
    """Worker 1's second commit fails after the chief's succeeded: the snapshot is discarded, both
    go back to the one before, and the chief's records since are trained again with their
    outputs, already visible, withheld. Every latent is visible exactly once."""
    processes, settings = start_workers(
        settings_factory,
        tmp_path,
        "--idle-timeout",
        "6",
        overrides=EXACTLY_ONCE,
        fault_hooks={1: {"FAULT_COMMIT_FAILS_AT": "2"}},
    )
    records = 3000
    feed(settings, records)
    ends = finished(processes)
    assert ends[0] == ends[1], ends
    check_exactly_once(settings, records)
    check_latents_exactly_once(settings, records)
    chief, other = (p.log_text() for p in processes)
    assert "injected by FAULT_COMMIT_FAILS_AT" in other
    assert "discarding snapshot" in chief and "not every worker committed it" in chief
    assert "already have their outputs published" in chief


def test_exactly_once_workers_killed_mid_run_and_restarted_publish_every_latent_once(
    settings_factory, tmp_path
):
    processes, settings = start_workers(settings_factory, tmp_path / "first", overrides=EXACTLY_ONCE)
    records = 3000
    feed(settings, records)
    chief, victim = processes
    chief.wait_for_metrics()
    chief.wait_for("streamvi_snapshots_total", 2, timeout=300)
    victim.signal(signal.SIGKILL)
    assert victim.wait(30) == -signal.SIGKILL
    assert chief.wait(120) not in (0, None), chief.log_text()[-3000:]
    restarted, _ = start_workers(
        settings_factory, tmp_path / "second", "--idle-timeout", "5", overrides=EXACTLY_ONCE
    )
    ends = finished(restarted)
    assert ends[0] == ends[1], ends
    check_exactly_once(settings, records)
    check_latents_exactly_once(settings, records)
