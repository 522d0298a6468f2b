"""Encoder replicas against the real (embedded) broker: two replicas share a 4-partition topic,
every record is encoded (exactly once under exactly_once), each latent equals ``streamvi encode``
with the snapshot it names, a SIGKILLed replica's partitions are taken over, and a newer snapshot
is hot-reloaded while a corrupt one is skipped and counted."""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import orjson
import pytest

from streamvi.datasets import load_digits
from streamvi.io.admin import ensure_topics
from streamvi.snapshots import SnapshotStore
from tests.integration.faultkit import (
    ROOT,
    STREAMVI,
    DaemonProcess,
    cli_env,
    committed_offsets,
    produce,
    read_all,
    read_committed_emulated,
    sequenced_records,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 4


def replica_overrides(guarantee: str) -> list[str]:
    return [
        f"processing.guarantee={guarantee}",
        f"kafka.topic_partitions={PARTITIONS}",
        "kafka.session_timeout_ms=3000",
        "kafka.heartbeat_interval_ms=500",
        "kafka.max_poll_records=200",
        "model.encoder_hidden=[32]",
        "training.publish_latents=false",  # the trainer's side; replicas publish the latents
        "snapshots.every_steps=10",
        "snapshots.keep=1000",  # every snapshot a latent names stays on disk to be checked
        "serving.reload_interval_seconds=0.5",
        "serving.commit_interval_seconds=1",
    ]


def latents_of(settings, expected: int) -> list[dict]:
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    if settings.processing.guarantee == "exactly_once":
        messages = read_committed_emulated(bootstrap, kafka.latents_topic, expected=expected)
    else:
        messages = read_all(bootstrap, kafka.latents_topic, expected=expected)
    return [orjson.loads(m.value) for m in messages]


def sequence(latent: dict) -> int:
    return int(latent["id"].split("-")[1])


def offline_encodings(settings, snapshot: str, seqs: list[int], tmp_path: Path) -> list[dict]:
    """``streamvi encode`` (the CLI, in a subprocess) on the records ``seqs``, with ``snapshot``."""
    x = load_digits().x
    rows = np.stack([x[i % len(x)] for i in seqs]).astype(np.float32)
    path = tmp_path / f"{snapshot}.npy"
    np.save(path, rows)
    data = str(path)
    out = subprocess.run(
        [
            *STREAMVI,
            "encode",
            "--snapshot",
            str(Path(settings.snapshots.dir) / snapshot),
            "--input",
            str(data),
        ],
        env=cli_env(settings),
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=300,
    )
    return [orjson.loads(line) for line in out.stdout.splitlines()]


def check_against_encode(settings, latents: list[dict], tmp_path: Path) -> dict[str, float]:
    """Every latent's z equals ``streamvi encode`` with its snapshot; its ELBO is an estimate of
    the same bound (the difference of two independent single-sample estimates has mean 0)."""
    by_snapshot: dict[str, list[dict]] = collections.defaultdict(list)
    for latent in latents:
        by_snapshot[latent["snapshot"]].append(latent)
    worst = 0.0
    differences: list[float] = []
    for snapshot, group in by_snapshot.items():
        offline = offline_encodings(settings, snapshot, [sequence(m) for m in group], tmp_path)
        for online, reference in zip(group, offline, strict=True):
            assert online["model_step"] == reference["model_step"]
            worst = max(
                worst,
                float(np.max(np.abs(np.subtract(online["z_mean"], reference["z_mean"])))),
                float(np.max(np.abs(np.subtract(online["z_scale"], reference["z_scale"])))),
            )
            differences.append(online["elbo"] - reference["elbo"])
    diff = np.array(differences)
    standard_error = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    assert worst < 1e-4, worst  # float32 through the same network; XLA may fuse differently per batch
    assert abs(diff.mean()) < 5 * standard_error, (diff.mean(), standard_error)
    return {"max_abs_z_difference": worst, "snapshots": len(by_snapshot)}


def trusted_snapshots(settings) -> dict[str, int]:
    """Snapshot name -> step of every snapshot a replica may have served: under exactly_once only
    those whose offsets the trainer's group has committed."""
    store = SnapshotStore(settings.snapshots.dir)
    valid = list(store.valid())
    if settings.processing.guarantee == "exactly_once":
        committed = committed_offsets(settings.kafka.bootstrap_servers[0], settings.kafka.group_id)
        valid = [s for s in valid if all(o <= committed.get(p, 0) for p, o in s.offsets.items())]
    return {s.path.name: s.step for s in valid}


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_two_replicas_encode_every_record_of_a_four_partition_topic(settings_factory, tmp_path, guarantee):
    settings = settings_factory(*replica_overrides(guarantee))
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    records = 4000
    produce(bootstrap, kafka.input_topic, sequenced_records(0, records))
    trainer = DaemonProcess(settings, tmp_path / "trainer.log", "--idle-timeout", "4")
    replicas = [
        DaemonProcess(settings, tmp_path / f"replica-{i}.log", "--idle-timeout", "6", command="serve")
        for i in range(2)
    ]
    for process in (trainer, *replicas):
        assert process.wait(600) == 0, process.log_text()[-3000:]
    latents = latents_of(settings, records)
    seqs = collections.Counter(sequence(m) for m in latents)
    assert set(seqs) == set(range(records))  # nothing lost
    if guarantee == "exactly_once":
        assert max(seqs.values()) == 1  # and nothing visible twice
    # each replica encoded part of the stream; the partitions were shared
    assert all("encoded" in p.log_text() for p in replicas)
    committed = committed_offsets(bootstrap, settings.serving.group_id)
    assert sum(committed.values()) == records and len(committed) == PARTITIONS, committed
    trusted = trusted_snapshots(settings)
    assert {m["snapshot"] for m in latents} <= set(trusted)  # never a snapshot that was not trusted
    assert all(trusted[m["snapshot"]] == m["model_step"] for m in latents)
    figures = check_against_encode(settings, latents, tmp_path)
    print(f"\n{guarantee}: {len(latents)} latents, {figures}")  # the stated difference, with -s


def readiness(process: DaemonProcess) -> int:
    assert process.metrics_url is not None
    try:
        with urllib.request.urlopen(process.metrics_url.replace("/metrics", "/readyz"), timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_replicas_started_before_any_snapshot_wait_and_a_killed_ones_partitions_are_taken_over(
    settings_factory, tmp_path
):
    settings = settings_factory(*replica_overrides("at_least_once"))
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    records = 4000
    produce(bootstrap, kafka.input_topic, sequenced_records(0, 400))
    # no snapshot yet: the replicas wait, not ready, encoding nothing
    survivor = DaemonProcess(settings, tmp_path / "survivor.log", "--idle-timeout", "8", command="serve")
    victim = DaemonProcess(settings, tmp_path / "victim.log", command="serve")
    for process in (survivor, victim):
        process.wait_for_metrics()
    time.sleep(2)
    assert [readiness(p) for p in (survivor, victim)] == [503, 503]
    assert [p.sample("streamvi_records_encoded_total") for p in (survivor, victim)] == [0, 0]
    trainer = DaemonProcess(settings, tmp_path / "trainer.log", "--idle-timeout", "3")
    assert trainer.wait(300) == 0, trainer.log_text()[-3000:]
    for process in (survivor, victim):
        process.wait_for("streamvi_model_step", 1, timeout=60)
    produce(bootstrap, kafka.input_topic, sequenced_records(400, records - 400))
    victim.wait_for("streamvi_records_encoded_total", 300)
    victim.signal(signal.SIGKILL)
    assert victim.wait(30) == -signal.SIGKILL
    assert survivor.wait(600) == 0, survivor.log_text()[-3000:]
    latents = latents_of(settings, records)
    assert set(sequence(m) for m in latents) == set(range(records))  # nothing lost
    committed = committed_offsets(bootstrap, settings.serving.group_id)
    assert sum(committed.values()) == records


def test_a_newer_snapshot_is_hot_reloaded_and_a_corrupt_one_skipped(settings_factory, tmp_path):
    settings = settings_factory(*replica_overrides("exactly_once"))
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    store = SnapshotStore(settings.snapshots.dir)

    def train(start: int, count: int) -> None:
        produce(bootstrap, kafka.input_topic, sequenced_records(start, count))
        trainer = DaemonProcess(settings, tmp_path / f"trainer-{start}.log", "--idle-timeout", "3")
        assert trainer.wait(300) == 0, trainer.log_text()[-3000:]

    train(0, 1000)
    first = store.latest()
    replica = DaemonProcess(settings, tmp_path / "replica.log", command="serve")
    replica.wait_for_metrics()
    replica.wait_for("streamvi_records_encoded_total", 1000)
    assert replica.sample("streamvi_model_step") == first.step
    train(1000, 1000)  # the trainer writes newer snapshots while the replica serves
    second = store.latest()
    assert second.step > first.step
    replica.wait_for("streamvi_model_step", second.step, timeout=60)
    assert replica.sample("streamvi_model_step") == second.step
    # a newer snapshot that fails its checksum: skipped, counted, the replica keeps the model
    damaged = Path(settings.snapshots.dir) / f"snapshot-{second.step + 100:012d}-{time.time_ns():020d}"
    shutil.copytree(second.path, damaged)
    (damaged / "checkpoint" / "state.index").write_bytes(b"damaged")
    replica.wait_for('streamvi_snapshot_reload_failures_total{reason="corrupt"}', 1, timeout=60)
    produce(bootstrap, kafka.input_topic, sequenced_records(2000, 500))
    replica.wait_for("streamvi_records_encoded_total", 2500)
    assert replica.sample("streamvi_model_step") == second.step
    assert replica.sample("streamvi_snapshot_reloads_total") >= 1
    assert 0 <= replica.sample("streamvi_snapshot_age_seconds") < 600
    replica.signal(signal.SIGTERM)
    assert replica.wait(60) == 0, replica.log_text()[-3000:]
    latents = latents_of(settings, 2500)
    steps = {sequence(m): m["model_step"] for m in latents}
    assert sorted(steps) == list(range(2500))
    trusted = trusted_snapshots(settings)
    assert {m["snapshot"] for m in latents} <= set(trusted)
    assert all(steps[i] == first.step for i in range(1000))  # before any newer snapshot existed
    assert all(steps[i] == second.step for i in range(2000, 2500))  # after the reload
    assert sum(v == second.step for v in steps.values()) >= 500
