"""Encoder replicas on in-memory sources and sinks: every record encoded with the snapshot it
names, hot reload between batches, corrupt and mismatched snapshots skipped, trust under
exactly-once, and the trainer's training share."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import orjson
import pytest
import tensorflow as tf
from prometheus_client import CollectorRegistry

from streamvi.config import load_settings
from streamvi.io.base import RawRecord
from streamvi.io.codecs import RecordDecoder
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.metrics import EncoderMetrics, Metrics
from streamvi.runtime import build_trainer
from streamvi.snapshots import SnapshotStore
from streamvi.snapshots.base import SnapshotInfo
from streamvi.snapshots.trust import CommittedTrust, DurableTrust
from streamvi.snapshots.watcher import ReloadEvents, SnapshotWatcher
from streamvi.stream import CheckpointPolicy, EncoderLoop, OnlineLoop, OutputTopics, TrainingShare
from streamvi.stream.ingest import Ingest
from streamvi.training.sampling import TrainingSample
from tests.unit.test_loop import TOPICS, make_loop, records
from tests.unit.test_trainer import data

OVERRIDES = ["input.dim=6", "model.latent_dim=2", "model.encoder_hidden=[8]", "training.batch_size=4"]


def settings(*extra: str):
    return load_settings(overrides=[*OVERRIDES, *extra], environ={})


class Failures(ReloadEvents):
    def __init__(self, metrics: EncoderMetrics) -> None:
        self.metrics = metrics

    def failed(self, path, reason, detail):
        self.metrics.snapshot_reload_failures.labels(reason=reason).inc()


def train(store: SnapshotStore, stream: list[RawRecord]) -> OnlineLoop:
    """A trainer that consumes ``stream`` and leaves its snapshots in ``store``."""
    loop = make_loop(MemorySource(stream), MemorySink(), store, every_steps=3)
    loop.snapshot_meta.update(config=settings().public_dict())  # as the daemon's snapshots record it
    loop.run(max_records=len(stream))
    return loop


def watcher(store, metrics, config=None, trust=None, interval=3600.0):
    config = config if config is not None else settings()
    return SnapshotWatcher(
        store,
        trust or DurableTrust(),
        lambda: build_trainer(config),
        config.public_dict(),
        interval,
        Failures(metrics),
    )


def replica(source, sink, watch, metrics, exactly_once=False) -> EncoderLoop:
    from streamvi.stream import ProcessingPolicy

    first = watch.wait_for_first(threading.Event())
    assert first is not None
    return EncoderLoop(
        source=source,
        sink=sink,
        decoder=RecordDecoder("json", 6, 4096),
        watcher=watch,
        model=first,
        topics=TOPICS,
        policy=CheckpointPolicy(every_steps=2**62, every_seconds=3600),
        max_batch_latency_seconds=5.0,
        metrics=metrics,
        max_poll_records=5,
        processing=ProcessingPolicy(exactly_once=exactly_once),
    )


def latents(sink: MemorySink) -> list[dict]:
    return [orjson.loads(m.value) for m in sink.on_topic("lat")]


def test_replica_encodes_every_record_with_the_snapshot_it_names(tmp_path):
    store = SnapshotStore(tmp_path)
    train(store, records(40))
    newest = store.latest()
    metrics = EncoderMetrics(CollectorRegistry())
    assert math.isnan(metrics.snapshot_age.collect()[0].samples[0].value)
    source, sink = MemorySource(records(30, bad_every=10)), MemorySink()
    loop = replica(source, sink, watcher(store, metrics), metrics)
    counts = loop.run(max_records=30)
    out = latents(sink)
    assert sorted(m["offset"] for m in out) == [o for o in range(30) if o % 10 != 9]
    assert {m["snapshot"] for m in out} == {newest.name}
    assert {m["model_step"] for m in out} == {newest.step}
    assert [dict(m.headers)["streamvi.error.reason"] for m in sink.on_topic("dlq")] == [b"wrong_length"] * 3
    assert sink.on_topic("met") == []  # a replica takes no steps
    assert counts.records_trained == 0 and counts.steps == 0 and counts.latents_published == 27
    assert source.committed == {("in", 0): 30}
    assert metrics.records_encoded._value.get() == 27
    assert metrics.model_step._value.get() == newest.step
    assert 0.0 <= metrics.snapshot_age.collect()[0].samples[0].value < 600.0
    # z is deterministic given x: it equals what the snapshot's model gives offline (streamvi encode)
    offline = build_trainer(settings())
    store.restore(tf.train.Checkpoint(**offline.checkpoint_objects()), newest)
    x = data(30, dim=6)
    rows = [o for o in range(30) if o % 10 != 9]
    expected = offline.evaluate(x[rows])
    by_offset = {m["offset"]: m for m in out}
    got_loc = np.array([by_offset[o]["z_mean"] for o in rows])
    got_scale = np.array([by_offset[o]["z_scale"] for o in rows])
    np.testing.assert_allclose(got_loc, expected.z_loc, atol=1e-5)
    np.testing.assert_allclose(got_scale, expected.z_scale, atol=1e-5)


def test_hot_reload_switches_between_batches_and_skips_a_corrupt_snapshot(tmp_path):
    store = SnapshotStore(tmp_path, keep=10)
    trainer_stream = records(80)
    trainer_loop = make_loop(MemorySource(trainer_stream), MemorySink(), store, every_steps=3)
    trainer_loop.run(max_records=24)
    first = store.latest()
    metrics = EncoderMetrics(CollectorRegistry())
    watch = watcher(store, metrics)
    source, sink = MemorySource(records(40)), MemorySink()
    loop = replica(source, sink, watch, metrics)
    loop.run(max_records=12)
    # the trainer goes on and writes newer snapshots; the newest is damaged after it was written
    trainer_loop.run(max_records=48)
    damaged = store.latest()
    (damaged.path / "checkpoint" / "state.index").write_bytes(b"damaged")
    good = next(store.valid())  # the newest that still verifies
    assert damaged.step > good.step > first.step
    assert watch.check() is not None  # loads `good` beside the model in use
    assert watch.check() is None  # nothing newer; the damaged one is not counted twice
    loop.run(max_records=28)
    out = sorted(latents(sink), key=lambda m: m["offset"])
    assert [m["offset"] for m in out] == list(range(40))
    steps = [m["model_step"] for m in out]
    assert set(steps) == {first.step, good.step}
    assert steps == sorted(steps)  # once switched, never back
    assert steps[:12] == [first.step] * 12  # what was encoded before the reload
    switch = steps.index(good.step)
    assert switch % 4 == 0  # at a batch boundary (batches of 4): no batch mixes two models
    assert {m["snapshot"] for m in out if m["model_step"] == good.step} == {good.name}
    failures = metrics.snapshot_reload_failures
    assert failures.labels(reason="corrupt")._value.get() == 1
    assert metrics.snapshot_reloads._value.get() == 1
    assert metrics.model_step._value.get() == good.step


def test_a_snapshot_written_under_another_model_is_skipped(tmp_path):
    store = SnapshotStore(tmp_path)
    train(store, records(24))
    metrics = EncoderMetrics(CollectorRegistry())
    other = settings("model.latent_dim=3")
    watch = watcher(store, metrics, config=other)
    assert watch.check() is None
    assert watch.check() is None
    mismatched = len(list(store.valid()))  # each snapshot skipped once, however often it is seen
    assert mismatched >= 1
    assert metrics.snapshot_reload_failures.labels(reason="config_mismatch")._value.get() == mismatched
    stop = threading.Event()
    stop.set()
    assert watch.wait_for_first(stop) is None


def test_exactly_once_replicas_trust_only_snapshots_whose_transaction_committed(tmp_path):
    store = SnapshotStore(tmp_path, keep=10)
    train(store, records(48))
    snapshots = list(store.valid())
    assert len(snapshots) >= 3
    committed: dict = {}
    metrics = EncoderMetrics(CollectorRegistry())
    trust = CommittedTrust(lambda partitions: {p: committed[p] for p in partitions if p in committed})
    watch = watcher(store, metrics, trust=trust)
    assert watch.check() is None  # nothing committed yet: nothing is trusted
    older, newest = snapshots[1], snapshots[0]
    committed.update(older.offsets)
    assert watch.check().info.name == older.name
    committed.update(newest.offsets)
    assert watch.check().info.name == newest.name
    assert watch.check() is None


def test_committed_trust_is_the_trainers_rule():
    def info(offset: int) -> SnapshotInfo:
        return SnapshotInfo(Path(f"snapshot-{offset}"), {"offsets": {"in": {"0": offset}}})

    trust = CommittedTrust(lambda partitions: {("in", 0): 10})
    assert trust.trusted([info(12), info(10), info(3)]) == [False, True, True]


@pytest.mark.parametrize("fraction", [0.25, 0.6])
def test_the_training_share_is_a_stable_hash_sample_of_the_given_size(fraction):
    sample = TrainingSample(fraction)
    stream = [RawRecord("in", 0, o, f"key-{o}".encode(), b"") for o in range(20_000)]
    chosen = np.array([sample.selects(r) for r in stream])
    # binomial: the share is within 4 standard errors of the fraction
    se = math.sqrt(fraction * (1 - fraction) / len(stream))
    assert abs(chosen.mean() - fraction) < 4 * se
    assert [sample.selects(r) for r in stream[:500]] == list(chosen[:500])  # the same every time
    # independent of the held-out share (CRC-32 of the same key): as often among held-out records
    from streamvi.training.heldout import HeldOutReservoir

    heldout = np.array([HeldOutReservoir(0.2, 1, 1).selects(r) for r in stream])
    among = chosen[heldout].mean()
    se_among = math.sqrt(fraction * (1 - fraction) / heldout.sum())
    assert abs(among - fraction) < 4 * se_among


def test_a_trainer_without_latents_trains_on_its_share_only(tmp_path):
    stream = records(200)
    share = TrainingShare(0.5, score_all=False)
    config = settings()
    sink = MemorySink()
    loop = OnlineLoop(
        source=MemorySource(stream),
        sink=sink,
        decoder=RecordDecoder("json", 6, 4096),
        trainer=build_trainer(config),
        store=SnapshotStore(tmp_path),
        topics=OutputTopics(None, "met", "dlq"),
        policy=CheckpointPolicy(every_steps=10, every_seconds=3600),
        max_batch_latency_seconds=5.0,
        metrics=(metrics := Metrics(CollectorRegistry())),
        max_poll_records=7,
        share=share,
    )
    loop.restore()
    counts = loop.run(max_records=200)
    expected = sum(share.trains(r) for r in stream)
    assert 0 < expected < 200
    assert counts.records_trained == expected
    assert metrics.records_outside_share._value.get() == 200 - expected
    assert sink.on_topic("lat") == []
    assert sum(orjson.loads(m.value)["records"] for m in sink.on_topic("met")) == expected
    assert SnapshotStore(tmp_path).latest().offsets == {("in", 0): 200}  # every record consumed


def test_a_trainer_with_latents_scores_every_record_and_trains_on_its_share(tmp_path):
    stream = records(60)
    ingest = Ingest(RecordDecoder("json", 6, 4096), None, TrainingShare(0.5, score_all=True))
    fetch = ingest.decode(stream)
    assert fetch.keep is None
    assert fetch.train.sum() == sum(TrainingSample(0.5).selects(r) for r in stream)
    assert fetch.outside_share == 60 - fetch.train.sum()


class RebalancingSource(MemorySource):
    """Revokes every partition and assigns them again (at the committed offsets) at poll ``at``,
    once ``before`` is set: a rebalance at a chosen moment."""

    def __init__(self, records, at: int, before: threading.Event, after: threading.Event) -> None:
        super().__init__(records)
        self.at, self.before, self.after = at, before, after
        self.polls = 0
        self.rebalanced = False

    def poll(self, timeout_seconds, max_records):
        self.polls += 1
        if self.polls == self.at:
            assert self.before.wait(60)
            self._on_revoked(self._partitions())
            self._assigned = False  # the next poll assigns them again, from the committed offsets
            self.rebalanced = True
            self.after.set()
        return super().poll(timeout_seconds, max_records)


def test_a_rebalance_while_a_reload_is_in_progress_loses_nothing_and_duplicates_nothing(tmp_path):
    store = SnapshotStore(tmp_path, keep=10)
    trainer_loop = make_loop(MemorySource(records(60)), MemorySink(), store, every_steps=3)
    trainer_loop.run(max_records=24)
    first = store.latest()
    loading, rebalanced = threading.Event(), threading.Event()
    config = settings()

    def slow_build():
        """The reload of the newer snapshot starts, and waits until the partitions moved."""
        loading.set()
        assert rebalanced.wait(60)
        return build_trainer(config)

    metrics = EncoderMetrics(CollectorRegistry())
    watch = SnapshotWatcher(
        store, DurableTrust(), lambda: build_trainer(config), None, 0.05, Failures(metrics)
    )
    source = RebalancingSource(records(40), at=4, before=loading, after=rebalanced)
    sink = MemorySink(transactional=True)
    loop = replica(source, sink, watch, metrics, exactly_once=True)
    trainer_loop.run(max_records=24)  # a newer snapshot for the watcher's thread to load
    newer = store.latest()
    watch.build_trainer = slow_build
    loop.run(max_records=40)
    assert source.rebalanced
    out = latents(sink)
    assert sorted(m["offset"] for m in out) == list(range(40))  # each once: exactly-once in memory
    assert source.committed == {("in", 0): 40}
    steps = [m["model_step"] for m in sorted(out, key=lambda m: m["offset"])]
    assert set(steps) <= {first.step, newer.step} and steps == sorted(steps)
