"""Fault injection against the real (embedded) broker: kills, signals, broker outage, corrupt
snapshots, a second daemon, slow steps and bad input. The heavy randomized run is bench/faults.py."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request

import orjson
import pytest
from prometheus_client import CollectorRegistry

from streamvi.errors import SnapshotLockedError
from streamvi.io.admin import ensure_topics
from streamvi.io.codecs import HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_TOPIC
from streamvi.runtime import build_daemon
from streamvi.snapshots import SnapshotStore
from tests.integration.conftest import read_topic
from tests.integration.faultkit import (
    DaemonProcess,
    committed_offsets,
    fault_overrides,
    produce,
    read_all,
    read_committed_emulated,
    run_kill_scenario,
    sequenced_records,
)

pytestmark = [pytest.mark.integration, pytest.mark.fault]

# Exactly-once outputs are read as a read_committed consumer would see them. The embedded broker
# does not report aborted transactions in fetch responses, so kafka-python's own read_committed
# would show aborted records; read_committed_emulated applies the transaction markers itself.


@pytest.mark.parametrize(("guarantee", "kills", "seed"), [("exactly_once", 3, 5), ("at_least_once", 2, 11)])
def test_sigkill_at_random_moments_loses_nothing(settings_factory, tmp_path, guarantee, kills, seed):
    settings = settings_factory(*fault_overrides(guarantee))
    ensure_topics(settings.kafka)
    records = 2400
    report = run_kill_scenario(settings, records, kills, seed, tmp_path, feed_batches=2)
    assert report.corrupt_outputs == 0
    assert report.kills >= 1, report
    assert report.lost == 0, report
    assert report.duplicates <= report.max_duplicates_allowed, report
    if guarantee == "exactly_once":
        assert report.duplicates == 0, report
    # the model was trained on every record exactly once, and the group agrees with the snapshot
    assert report.snapshot_records_trained == records, report
    assert report.committed_offset == report.snapshot_offset == records, report


def test_sigterm_and_sigint_finish_the_checkpoint_and_a_restart_replays_nothing(settings_factory, tmp_path):
    settings = settings_factory(*fault_overrides("exactly_once"), "processing.shutdown_grace_seconds=20")
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    produce(bootstrap, kafka.input_topic, sequenced_records(0, 3000))
    total = 0
    for round_, signum in enumerate((signal.SIGTERM, signal.SIGINT)):
        daemon = DaemonProcess(settings, tmp_path / f"daemon-{round_}.log")
        daemon.wait_for_metrics()
        daemon.wait_for("streamvi_records_consumed_total", 200)
        daemon.signal(signum)  # mid-stream: outputs, snapshot and commit must all be final
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
        snapshot = SnapshotStore(settings.snapshots.dir).latest()
        committed = committed_offsets(bootstrap, kafka.group_id)[(kafka.input_topic, 0)]
        assert snapshot.offsets[(kafka.input_topic, 0)] == committed > total
        assert snapshot.meta["counts"]["records_trained"] == committed
        total = committed
    latents = read_committed_emulated(bootstrap, kafka.latents_topic, expected=total)
    ids = [orjson.loads(m.value)["id"] for m in latents]
    assert len(ids) == len(set(ids)) == total
    # a restart replays nothing: it resumes exactly where the clean stop committed
    more = DaemonProcess(settings, tmp_path / "daemon-last.log", "--idle-timeout", "3")
    assert more.wait(300) == 0
    offsets = sorted(orjson.loads(m.value)["offset"] for m in read_all(bootstrap, kafka.latents_topic))
    assert offsets == list(range(3000))


def test_broker_outage_readiness_and_nothing_lost(settings_factory, broker):
    settings = settings_factory(
        *fault_overrides("at_least_once"), "snapshots.every_steps=20", "kafka.request_timeout_ms=5000"
    )
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    produce(bootstrap, kafka.input_topic, sequenced_records(0, 500))
    daemon = build_daemon(settings, CollectorRegistry())
    base = daemon.metrics_url.rsplit("/", 1)[0]
    stop = threading.Event()
    thread = threading.Thread(target=daemon.run, args=(stop,))
    thread.start()

    def ready() -> bool:
        try:
            return urllib.request.urlopen(base + "/readyz", timeout=2).status == 200
        except (urllib.error.HTTPError, OSError):
            return False

    def wait_until(condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.1)
        return False

    try:
        assert wait_until(lambda: ready() and daemon.loop.counts.records_consumed >= 500, 60)
        step_before = daemon.loop.trainer.step
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            assert wait_until(lambda: not ready(), 20), "/readyz stayed ready with the broker paused"
            time.sleep(3)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        assert wait_until(ready, 60), "/readyz never came back after the broker resumed"
        assert daemon.loop.trainer.step >= step_before  # the model was kept, not reset
        produce(bootstrap, kafka.input_topic, sequenced_records(500, 500))
        assert wait_until(lambda: daemon.loop.counts.records_trained >= 1000, 90)
    finally:
        stop.set()
        thread.join(120)
    latents = read_all(bootstrap, kafka.latents_topic, expected=1000)
    ids = {orjson.loads(m.value)["id"] for m in latents}
    assert len(ids) == 1000  # nothing lost (at-least-once: a replay would only add duplicates)
    assert SnapshotStore(settings.snapshots.dir).latest().meta["counts"]["records_trained"] == 1000


def test_corrupt_newest_snapshot_falls_back_to_the_previous_one(settings_factory, caplog):
    settings = settings_factory(*fault_overrides("at_least_once"), "snapshots.every_steps=4")
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    produce(bootstrap, kafka.input_topic, sequenced_records(0, 300))
    build_daemon(settings, CollectorRegistry()).run(max_records=300)
    store = SnapshotStore(settings.snapshots.dir)
    newest, previous = store.candidates()[:2]
    data = next((newest / "checkpoint").glob("*.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated
    expected = store.verify(previous)

    registry = CollectorRegistry()
    with caplog.at_level("ERROR"):
        daemon = build_daemon(settings, registry)
    assert daemon.restored.path == previous and daemon.restored.step == expected.step
    assert registry.get_sample_value("streamvi_corrupt_snapshots_total") == 1
    assert any("corrupt snapshot" in r.getMessage() and newest.name in r.getMessage() for r in caplog.records)
    counts = daemon.run(idle_timeout_seconds=3)
    # the records after the previous snapshot were trained on again (once), nothing was lost
    assert counts.records_trained == 300
    assert (
        registry.get_sample_value("streamvi_replayed_records_total")
        == 300 - expected.offsets[(kafka.input_topic, 0)]
    )
    assert committed_offsets(bootstrap, kafka.group_id) == {(kafka.input_topic, 0): 300}


def test_a_second_daemon_on_the_same_snapshot_directory_refuses_to_start(settings_factory):
    settings = settings_factory()
    ensure_topics(settings.kafka)
    first = build_daemon(settings, CollectorRegistry())
    try:
        with pytest.raises(SnapshotLockedError) as info:
            build_daemon(settings, CollectorRegistry())
        message = str(info.value)
        assert str(settings.snapshots.dir) in message and f"pid {os.getpid()}" in message
    finally:
        first.close()
    build_daemon(settings, CollectorRegistry()).close()  # released with the first daemon


def test_slow_steps_keep_the_consumer_in_its_group(settings_factory):
    settings = settings_factory(
        *fault_overrides("exactly_once"),
        "kafka.max_poll_interval_ms=2000",
        "processing.keepalive_seconds=0.3",
        "snapshots.every_steps=3",
    )
    kafka = settings.kafka
    ensure_topics(kafka)
    produce(kafka.bootstrap_servers[0], kafka.input_topic, sequenced_records(0, 96))
    daemon = build_daemon(settings, CollectorRegistry())
    loop = daemon.loop
    train, write = loop.trainer.train_rows, loop.store.write

    def slow_train(*args, **kwargs):
        time.sleep(2.5)  # longer than max_poll_interval_ms
        return train(*args, **kwargs)

    def slow_write(*args, **kwargs):
        time.sleep(2.5)
        return write(*args, **kwargs)

    loop.trainer.train_rows = slow_train
    loop.store.write = slow_write
    assignments = []
    on_assigned = loop.on_assigned
    loop.source.set_rebalance_callbacks(
        lambda partitions: (assignments.append(list(partitions)), on_assigned(partitions)), loop.on_revoked
    )
    counts = daemon.run(max_records=96)
    assert counts.records_trained == 96 and counts.steps == 6
    # one assignment for the whole run: the consumer never fell out of its group and rejoined
    # (the revocation kafka-python reports on close is not a rebalance)
    assert assignments == [[(kafka.input_topic, 0)]], assignments
    latents = read_committed_emulated(kafka.bootstrap_servers[0], kafka.latents_topic, expected=96)
    assert len({orjson.loads(m.value)["id"] for m in latents}) == len(latents) == 96


BAD_INPUT = [
    (b"{not json", "invalid_json"),
    (b'{"x": "nope"}', "wrong_type"),
    (b'{"x": [0.5, 0.5]}', "wrong_length"),
    (b'{"x": [' + b"0.5, " * 63 + b"1e39]}", "non_finite"),
    (b"", "empty_value"),
    (b'{"x": [' + b"0.5, " * 40_000 + b"0.5]}", "oversize"),
    (b"\xff\xfe\x00{", "wrong_encoding"),
    (b"[1, 2]", "not_an_object"),
    (b'{"y": [1]}', "missing_field"),
]


def test_bad_input_is_dead_lettered_with_origin_and_the_rest_processed(settings_factory):
    settings = settings_factory(*fault_overrides("exactly_once"), "input.max_record_bytes=100000")
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    good = sequenced_records(0, 200)
    items: list[tuple[bytes | None, bytes]] = []
    for i, (key, value) in enumerate(good):
        items.append((key, value))
        if i % 20 == 10:
            bad_value, _ = BAD_INPUT[(i // 20) % len(BAD_INPUT)]
            items.append((f"bad-{i}".encode(), bad_value))
    bad_offsets = {offset: value for offset, (key, value) in enumerate(items) if key.startswith(b"bad-")}
    produce(bootstrap, kafka.input_topic, items)
    registry = CollectorRegistry()
    counts = build_daemon(settings, registry).run(max_records=len(items))
    assert counts.records_trained == 200 and counts.dead_letters == len(bad_offsets)

    latents = read_committed_emulated(bootstrap, kafka.latents_topic, expected=200)
    assert sorted(orjson.loads(m.value)["id"] for m in latents) == sorted(k.decode() for k, _ in good)
    dead = read_committed_emulated(bootstrap, kafka.dead_letter_topic, expected=len(bad_offsets))
    assert len(dead) == len(bad_offsets)
    reasons = dict(BAD_INPUT)
    for message in dead:
        headers = dict(message.headers)
        offset = int(headers[HEADER_OFFSET])
        assert message.value == bad_offsets[offset]  # the original bytes
        assert headers[HEADER_REASON].decode() == reasons[message.value]
        assert headers[HEADER_TOPIC] == kafka.input_topic.encode() and headers[HEADER_PARTITION] == b"0"
    by_reason: dict[str, int] = {}
    for value in bad_offsets.values():
        by_reason[reasons[value]] = by_reason.get(reasons[value], 0) + 1
    for reason, count in by_reason.items():
        assert registry.get_sample_value("streamvi_dead_letters_total", {"reason": reason}) == count
    assert set(by_reason) == set(reasons.values())


def test_records_without_a_required_context_are_dead_lettered(settings_factory):
    """A conditional model (input.context_dim > 0) never sees a record that lacks its context."""
    settings = settings_factory("input.context_dim=3")
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    items: list[tuple[bytes | None, bytes]] = []
    for i in range(64):
        document = {"id": f"r{i}", "x": [0.5] * 64, "c": [1.0, 0.0, 0.0]}
        if i % 8 == 3:
            del document["c"]
        items.append((f"r{i}".encode(), orjson.dumps(document)))
    produce(bootstrap, kafka.input_topic, items)
    registry = CollectorRegistry()
    counts = build_daemon(settings, registry).run(max_records=len(items))
    assert counts.records_trained == 56 and counts.dead_letters == 8
    assert registry.get_sample_value("streamvi_dead_letters_total", {"reason": "missing_context"}) == 8
    dead = read_topic(bootstrap, kafka.dead_letter_topic, 8)
    assert sorted(m.key for m in dead) == sorted(f"r{i}".encode() for i in range(3, 64, 8))
    assert {dict(m.headers)[HEADER_REASON] for m in dead} == {b"missing_context"}
