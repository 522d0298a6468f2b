"""The online loop on in-memory sources and sinks: outputs, dead letters, commit order, resume."""

from __future__ import annotations

import time

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from streamvi.config import load_settings
from streamvi.datasets import encode_record
from streamvi.io.base import RawRecord
from streamvi.io.codecs import RecordDecoder
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.metrics import Health, Metrics
from streamvi.runtime import build_trainer
from streamvi.snapshots import SnapshotStore
from streamvi.stream import CheckpointPolicy, OnlineLoop, OutputTopics
from tests.unit.test_trainer import data

TOPICS = OutputTopics("lat", "met", "dlq")


def records(n: int, start: int = 0, bad_every: int = 0) -> list[RawRecord]:
    x = data(n + start, dim=6)
    out = []
    for offset in range(start, start + n):
        value = encode_record(x[offset], f"r{offset}", "json")
        if bad_every and offset % bad_every == bad_every - 1:
            value = b'{"x": [1, 2]}'
        out.append(RawRecord("in", 0, offset, f"k{offset}".encode(), value))
    return out


def make_loop(source, sink, store, every_steps=3, registry=None, latency=5.0, pipeline_depth=2, overrides=()):
    settings = load_settings(
        overrides=[
            "input.dim=6",
            "model.latent_dim=2",
            "model.encoder_hidden=[8]",
            "training.batch_size=4",
            *overrides,
        ],
        environ={},
    )
    metrics = Metrics(registry or CollectorRegistry())
    loop = OnlineLoop(
        source=source,
        sink=sink,
        decoder=RecordDecoder("json", 6, 4096),
        trainer=build_trainer(settings),
        store=store,
        topics=TOPICS,
        policy=CheckpointPolicy(every_steps=every_steps, every_seconds=3600),
        max_batch_latency_seconds=latency,
        metrics=metrics,
        health=Health(),
        max_poll_records=5,
        pipeline_depth=pipeline_depth,
    )
    loop.restore()
    return loop


def test_every_record_gets_one_output_and_offsets_cover_them(tmp_path):
    source, sink = MemorySource(records(30, bad_every=10)), MemorySink()
    loop = make_loop(source, sink, SnapshotStore(tmp_path))
    counts = loop.run(max_records=30)
    latents = [orjson.loads(m.value) for m in sink.on_topic("lat")]
    dead = sink.on_topic("dlq")
    assert counts.records_consumed == 30 and counts.records_trained == 27 and counts.dead_letters == 3
    assert sorted(m["offset"] for m in latents) == [o for o in range(30) if o % 10 != 9]
    assert {m.key for m in sink.on_topic("lat")} == {f"k{o}".encode() for o in range(30) if o % 10 != 9}
    assert all(len(m["z_mean"]) == 2 and len(m["z_scale"]) == 2 for m in latents)
    assert [dict(m.headers)["streamvi.error.reason"] for m in dead] == [b"wrong_length"] * 3
    steps = [orjson.loads(m.value) for m in sink.on_topic("met")]
    assert len(steps) == counts.steps and sum(s["records"] for s in steps) == 27
    assert source.committed == {("in", 0): 30}
    assert SnapshotStore(tmp_path).latest().offsets == {("in", 0): 30}
    assert not sink.pending


def test_commit_order_is_flush_then_snapshot_then_commit(tmp_path):
    events: list[str] = []

    class Sink(MemorySink):
        def flush(self, timeout_seconds=None):
            events.append("flush")
            super().flush(timeout_seconds)

    class Store(SnapshotStore):
        def write(self, checkpoint, step, meta, **kwargs):
            events.append("snapshot")
            return super().write(checkpoint, step, meta, **kwargs)

    class Source(MemorySource):
        def commit(self, offsets):
            events.append("commit")
            super().commit(offsets)

    # one batch in flight at most: where checkpoints fall does not depend on the steps' timing
    loop = make_loop(Source(records(40)), Sink(), Store(tmp_path), every_steps=3, pipeline_depth=1)
    loop.run(max_records=40)
    assert events.count("commit") >= 3
    assert events == ["flush", "snapshot", "commit"] * events.count("commit")


def test_restart_resumes_at_snapshot_offsets_without_retraining(tmp_path):
    stream = records(40)
    first_sink = MemorySink()
    first = make_loop(MemorySource(stream[:24]), first_sink, SnapshotStore(tmp_path))
    first.run(max_records=24)
    assert first.trainer.step == 6

    source, sink = MemorySource(stream), MemorySink()
    second = make_loop(source, sink, SnapshotStore(tmp_path))
    assert second.trainer.step == 6 and second.counts.records_trained == 24
    second.run(max_records=16)
    offsets = sorted(orjson.loads(m.value)["offset"] for m in sink.on_topic("lat"))
    assert offsets == list(range(24, 40))  # nothing old consumed again
    assert second.trainer.step == 10 and second.counts.records_trained == 40
    assert source.committed == {("in", 0): 40}


def test_crash_before_checkpoint_replays_only_records_after_the_snapshot(tmp_path):
    stream = records(40)

    class Crash(Exception):
        pass

    class CrashingSink(MemorySink):
        def send(self, message):
            if message.topic == "lat" and orjson.loads(message.value)["offset"] >= 30:
                raise Crash
            super().send(message)

    first = make_loop(MemorySource(stream), CrashingSink(), SnapshotStore(tmp_path), every_steps=3)
    with pytest.raises(Crash):
        first.run(max_records=40)
    snapshot = SnapshotStore(tmp_path).latest()
    resume = snapshot.offsets[("in", 0)]  # the last checkpoint before the crash
    assert 12 <= resume <= 30 and snapshot.meta["counts"]["records_trained"] == resume

    source, sink = MemorySource(stream), MemorySink()
    second = make_loop(source, sink, SnapshotStore(tmp_path))
    assert second.trainer.step == snapshot.step
    second.run(max_records=40 - resume)
    assert sorted(orjson.loads(m.value)["offset"] for m in sink.on_topic("lat")) == list(range(resume, 40))
    assert second.counts.records_trained == 40  # every record trained on exactly once across the crash


def test_every_snapshot_counts_the_records_its_offsets_cover(tmp_path):
    """A checkpoint inside a fetch (fetches of 5, batches of 4, one every step) saves the records
    its offsets cover as consumed, not the whole fetch: a restart from it reads the rest of the
    fetch again, and counts it once."""
    store = SnapshotStore(tmp_path, keep=100)
    make_loop(MemorySource(records(30, bad_every=10)), MemorySink(), store, every_steps=1).run(max_records=30)
    snapshots = list(store.valid())
    covered = [s.offsets[("in", 0)] for s in snapshots]
    assert any(c % 5 for c in covered), covered  # some taken inside a fetch
    assert [s.meta["counts"]["records_consumed"] for s in snapshots] == covered

    # a restart from one taken inside a fetch ends with every record counted once
    middle = next(s for s in snapshots if s.offsets[("in", 0)] % 5)
    for info in snapshots:
        if info.step > middle.step:
            store.discard(info, "a crash before it")
    second = make_loop(MemorySource(records(30, bad_every=10)), MemorySink(), store)
    assert second.trainer.step == middle.step
    counts = second.run(max_records=30 - middle.offsets[("in", 0)])
    assert counts.records_consumed == 30


def test_partial_batch_closes_on_the_latency_bound(tmp_path):
    source, sink = MemorySource(records(3)), MemorySink()
    loop = make_loop(source, sink, SnapshotStore(tmp_path), latency=0.05)
    loop.run(idle_timeout_seconds=0.3)
    steps = [orjson.loads(m.value) for m in sink.on_topic("met")]
    assert [s["records"] for s in steps] == [3]
    assert loop.counts.records_trained == 3


def test_clean_stop_with_no_new_input_writes_no_snapshot(tmp_path):
    make_loop(MemorySource(records(8)), MemorySink(), SnapshotStore(tmp_path)).run(max_records=8)
    before = SnapshotStore(tmp_path).candidates()
    source = MemorySource(records(8))
    make_loop(source, MemorySink(), SnapshotStore(tmp_path)).run(idle_timeout_seconds=0.2)
    assert SnapshotStore(tmp_path).candidates() == before
    assert source.commits == []


def test_prometheus_counters_follow_the_loop(tmp_path):
    registry = CollectorRegistry()
    loop = make_loop(
        MemorySource(records(20, bad_every=5)), MemorySink(), SnapshotStore(tmp_path), registry=registry
    )
    loop.run(max_records=20)

    def value(name, **labels):
        return registry.get_sample_value(name, labels or None)

    assert value("streamvi_records_consumed_total") == 20
    assert value("streamvi_records_trained_total") == 16
    assert value("streamvi_dead_letters_total", reason="wrong_length") == 4
    assert value("streamvi_train_steps_total") == loop.counts.steps
    assert value("streamvi_step_duration_seconds_count") == loop.counts.steps
    assert value("streamvi_consumer_lag_records", topic="in", partition="0") == 0
    assert value("streamvi_last_snapshot_timestamp_seconds") > 0


def test_pipeline_depth_changes_timing_not_results(tmp_path):
    """Steps run one at a time in submission order whatever the depth, so the same stream gives the
    same latents, the same metrics and the same parameters bit for bit. (A checkpoint trains the
    open partial batch, so only the final one is allowed here: its position does not depend on timing.)"""
    runs = []
    for depth in (1, 4):
        source, sink = MemorySource(records(61, bad_every=7)), MemorySink()
        store = SnapshotStore(tmp_path / f"depth-{depth}")
        loop = make_loop(source, sink, store, every_steps=1000, pipeline_depth=depth)
        counts = loop.run(max_records=61)
        latents = [orjson.loads(m.value) for m in sink.on_topic("lat")]
        steps = [orjson.loads(m.value) for m in sink.on_topic("met")]
        weights = [v.numpy() for v in loop.trainer.model.trainable_variables]
        runs.append((counts, latents, steps, weights, source.committed))
    (counts1, latents1, steps1, weights1, committed1), (counts4, latents4, steps4, weights4, committed4) = (
        runs
    )
    assert counts1 == counts4 and committed1 == committed4 == {("in", 0): 61}
    assert [m["offset"] for m in latents1] == [m["offset"] for m in latents4]  # published in order
    assert latents1 == latents4
    strip = ("wall_time", "timestamp", "step_seconds")
    assert [{k: v for k, v in m.items() if k not in strip} for m in steps1] == [
        {k: v for k, v in m.items() if k not in strip} for m in steps4
    ]
    assert all(np.array_equal(a, b) for a, b in zip(weights1, weights4, strict=True))


def test_a_full_pipeline_holds_back_fetching(tmp_path):
    """Backpressure: with the step slower than the input, the loop never holds more than
    pipeline_depth submitted batches plus the one filling."""
    depth, seen = 2, []

    source, sink = MemorySource(records(48)), MemorySink()
    loop = make_loop(source, sink, SnapshotStore(tmp_path), every_steps=100, pipeline_depth=depth)
    train = loop.trainer.train_rows

    def slow_train(*args, **kwargs):
        seen.append(len(loop.pipeline))
        time.sleep(0.05)
        return train(*args, **kwargs)

    loop.trainer.train_rows = slow_train
    polled = []
    original_poll = source.poll

    def poll(timeout_seconds, max_records):
        out = original_poll(timeout_seconds, max_records)
        polled.append((len(loop.pipeline), len(out)))
        return out

    source.poll = poll
    counts = loop.run(max_records=48)
    assert counts.records_trained == 48
    assert max(seen) <= depth
    assert max(p for p, _ in polled) <= depth  # never fetched with more queued than the bound


def test_the_latency_bound_counts_from_a_records_append(tmp_path):
    """A batch closes at most max_batch_latency after its first record was appended (its timestamp),
    so time spent reaching the daemon is inside the bound; skew can only make it close sooner."""
    loop = make_loop(MemorySource([]), MemorySink(), SnapshotStore(tmp_path), latency=0.2)
    now_ms = int(time.time() * 1000)

    def left_after_adding(timestamp_ms: int) -> float:
        record = RawRecord("in", 0, 0, b"k", encode_record(data(1, dim=6)[0], "r", "json"), [], timestamp_ms)
        loop.batcher.clear()
        loop.handle([record])
        left = loop.batcher.time_left()
        assert left is not None
        return left

    assert 0.12 < left_after_adding(now_ms - 50) <= 0.15  # appended 50 ms ago: ~150 ms left
    assert left_after_adding(now_ms - 10_000) == 0.0  # an old record: due now, not 10 s ago
    assert 0.19 < left_after_adding(now_ms + 10_000) <= 0.2  # a clock ahead never extends the bound
    assert 0.19 < left_after_adding(-1) <= 0.2  # no timestamp: from arrival
