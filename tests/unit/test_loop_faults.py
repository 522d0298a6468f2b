"""The loop's fault handling on in-memory doubles: exactly-once crash windows, rewinds after failed
deliveries, replay counting, non-finite updates, bad input that never escapes the loop, the lock."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from streamvi.config import load_settings
from streamvi.datasets import encode_record
from streamvi.errors import ConfigError, OutputError, SnapshotLockedError
from streamvi.io.base import RawRecord
from streamvi.io.codecs import DEAD_LETTER_REASONS, HEADER_OFFSET, HEADER_REASON, RecordDecoder
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.metrics import Health, Metrics
from streamvi.runtime import build_trainer
from streamvi.snapshots import SnapshotStore
from streamvi.stream import CheckpointPolicy, OnlineLoop, OutputTopics, ProcessingPolicy
from streamvi.stream.recovery import RewindBackoff
from streamvi.training import Trainer
from tests.unit.test_codecs import payloads
from tests.unit.test_trainer import data

TOPICS = OutputTopics("lat", "met", "dlq")
DIM = 6


class Crash(BaseException):
    """A simulated SIGKILL: nothing in the loop catches it."""


def records(n: int, poison: set[int] | None = None) -> list[RawRecord]:
    x = data(n, dim=DIM)
    out = []
    for offset in range(n):
        row = x[offset] * (3e38 if poison and offset in poison else 1.0)
        out.append(
            RawRecord("in", 0, offset, f"k{offset}".encode(), encode_record(row, f"r{offset}", "json"))
        )
    return out


def make_loop(
    source,
    sink,
    store,
    *,
    exactly_once=False,
    registry=None,
    likelihood="bernoulli",
    pipeline_depth=1,
    trainer=None,
    **policy,
):
    settings = load_settings(
        overrides=[
            f"input.dim={DIM}",
            "model.latent_dim=2",
            "model.encoder_hidden=[8]",
            "training.batch_size=4",
            f"model.likelihood={likelihood}",
        ],
        environ={},
    )
    loop = OnlineLoop(
        source=source,
        sink=sink,
        decoder=RecordDecoder("json", DIM, 4096),
        trainer=trainer if trainer is not None else build_trainer(settings),
        store=store,
        topics=TOPICS,
        policy=CheckpointPolicy(every_steps=2, every_seconds=3600),
        max_batch_latency_seconds=5.0,  # batches close by size: checkpoint positions are deterministic
        metrics=Metrics(registry or CollectorRegistry()),
        health=Health(),
        max_poll_records=5,
        processing=ProcessingPolicy(exactly_once=exactly_once, retry_initial_seconds=0.01, **policy),
        pipeline_depth=pipeline_depth,  # 1: checkpoint positions do not depend on the steps' timing
    )
    loop.restore()
    return loop


def latent_offsets(messages) -> list[int]:
    return sorted(orjson.loads(m.value)["offset"] for m in messages if m.topic == "lat")


def restarted_source(stream, previous: MemorySource) -> MemorySource:
    source = MemorySource(stream)
    source.committed = dict(previous.committed)  # the group's offsets live in the broker
    return source


@pytest.mark.parametrize("window", ["mid_batch", "mid_snapshot", "before_commit", "after_commit"])
def test_exactly_once_survives_a_crash_in_every_window(tmp_path, window):
    stream = records(40)
    source, sink = MemorySource(stream), MemorySink(transactional=True)
    loop = make_loop(source, sink, SnapshotStore(tmp_path), exactly_once=True)
    calls = {"n": 0}

    def crash_on_third(original):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3 and window != "after_commit":
                raise Crash
            result = original(*args, **kwargs)
            if calls["n"] == 3:
                raise Crash
            return result

        return wrapped

    if window == "mid_batch":
        loop.trainer.train_rows = crash_on_third(loop.trainer.train_rows)
    elif window == "mid_snapshot":
        loop.store.write = crash_on_third(loop.store.write)
    else:  # before the transaction commits, or right after it (before pruning)
        sink.commit_transaction = crash_on_third(sink.commit_transaction)
    with pytest.raises(Crash):
        loop.run(max_records=40)
    visible = list(sink.delivered)  # what read_committed consumers saw before the crash

    source2, sink2 = restarted_source(stream, source), MemorySink(transactional=True)
    second = make_loop(source2, sink2, SnapshotStore(tmp_path), exactly_once=True)
    assert second.counts.records_trained == source.committed.get(("in", 0), 0)
    second.run(idle_timeout_seconds=0.3)
    assert latent_offsets(visible + sink2.delivered) == list(range(40))  # each exactly once
    assert second.counts.records_trained == 40 == source2.committed[("in", 0)]
    assert SnapshotStore(tmp_path).latest().offsets == {("in", 0): 40}


def test_exactly_once_discards_a_snapshot_whose_transaction_never_committed(tmp_path):
    stream = records(24)
    source, sink = MemorySource(stream), MemorySink(transactional=True)
    loop = make_loop(source, sink, SnapshotStore(tmp_path), exactly_once=True)

    def never(*args, **kwargs):
        raise Crash

    loop.run(max_records=16)  # two committed checkpoints (steps 2 and 4)
    sink.commit_transaction = never
    with pytest.raises(Crash):
        loop.run(max_records=8)
    pending = SnapshotStore(tmp_path).latest()
    assert pending.offsets == {("in", 0): 24} and source.committed == {("in", 0): 16}

    second = make_loop(
        restarted_source(stream, source),
        MemorySink(transactional=True),
        SnapshotStore(tmp_path),
        exactly_once=True,
    )
    assert second.trainer.step == 4 and second.state.next_offsets == {("in", 0): 16}
    assert pending.path not in SnapshotStore(tmp_path).candidates()


def test_exactly_once_restored_behind_the_committed_offsets_trains_again_and_withholds_outputs(tmp_path):
    """A newer snapshot lost (or, with trainer workers, one only some workers committed): the
    group's offsets are past the restored snapshot. Its records are trained again, since the
    snapshot has not learnt from them, but their outputs (latents and dead letters), already
    visible, are not sent again."""
    stream = records(24)
    stream[18] = RawRecord("in", 0, 18, b"k18", b"{not json")  # a dead letter
    source, sink = MemorySource(stream), MemorySink(transactional=True)
    loop = make_loop(source, sink, SnapshotStore(tmp_path), exactly_once=True)
    loop.run(max_records=24)
    newest = SnapshotStore(tmp_path).latest()
    assert source.committed == {("in", 0): 24} == newest.offsets
    shutil.rmtree(newest.path)  # lost
    visible = list(sink.delivered)

    registry = CollectorRegistry()
    source2, sink2 = restarted_source(stream, source), MemorySink(transactional=True)
    second = make_loop(source2, sink2, SnapshotStore(tmp_path), exactly_once=True, registry=registry)
    restored = second.state.next_offsets[("in", 0)]
    assert 0 < restored < 24 and second.counts.records_trained < 23
    second.run(idle_timeout_seconds=0.3)
    assert sink2.delivered == [m for m in sink2.delivered if m.topic == "met"]  # nothing per record
    assert latent_offsets(visible) == [o for o in range(24) if o != 18]
    assert [m.topic for m in visible].count("dlq") == 1
    assert registry.get_sample_value("streamvi_outputs_withheld_total") == 24 - restored
    # trained once in the restored lineage: the snapshot's records, then all the others again
    assert (
        second.counts.records_trained
        == 23
        == SnapshotStore(tmp_path).latest().meta["counts"]["records_trained"]
    )
    assert source2.committed == {("in", 0): 24}


def test_failed_delivery_rewinds_and_loses_nothing(tmp_path):
    class FlakySink(MemorySink):
        failures = 1

        def flush(self, timeout_seconds=None):
            if self.failures:
                self.failures -= 1
                self.pending.clear()  # the broker never got them
                raise OutputError("broker unreachable")
            super().flush(timeout_seconds)

    registry = CollectorRegistry()
    source, sink = MemorySource(records(24)), FlakySink()
    loop = make_loop(source, sink, SnapshotStore(tmp_path), registry=registry)
    loop.run(idle_timeout_seconds=0.5)
    assert latent_offsets(sink.delivered) == list(range(24))
    assert loop.counts.records_trained == 24 == source.committed[("in", 0)]
    # the first interval: two finished steps and the one in flight when the checkpoint fell due
    assert registry.get_sample_value("streamvi_replayed_records_total") == 12


def test_at_least_once_restart_counts_the_records_it_outputs_again(tmp_path):
    stream = records(40)

    class CrashingSink(MemorySink):
        def send(self, message):
            if message.topic == "lat" and orjson.loads(message.value)["offset"] >= 30:
                raise Crash
            super().send(message)

    first = make_loop(MemorySource(stream), CrashingSink(), SnapshotStore(tmp_path))
    with pytest.raises(Crash):
        first.run(max_records=40)
    snapshot = SnapshotStore(tmp_path).latest()
    registry = CollectorRegistry()
    second = make_loop(MemorySource(stream), MemorySink(), SnapshotStore(tmp_path), registry=registry)
    second.run(idle_timeout_seconds=0.3)
    replayed = registry.get_sample_value("streamvi_replayed_records_total")
    # everything between the snapshot and the last record handed to the sink before the crash
    assert 0 < replayed <= 40 - snapshot.offsets[("in", 0)]
    assert second.counts.records_trained == 40


def test_non_finite_updates_are_skipped_then_the_last_good_snapshot_is_restored(tmp_path):
    poison = set(range(8, 24))  # four whole batches whose loss overflows
    registry = CollectorRegistry()
    loop = make_loop(
        MemorySource(records(40, poison)),
        MemorySink(),
        SnapshotStore(tmp_path),
        registry=registry,
        likelihood="gaussian",
        max_nonfinite_in_a_row=3,
    )
    good = None

    original = loop.recovery.recover_from_divergence

    def recover():
        nonlocal good
        original()
        good = [v.numpy().copy() for v in loop.trainer.model.trainable_variables]

    loop.recovery.recover_from_divergence = recover
    loop.run(max_records=40)
    assert registry.get_sample_value("streamvi_nonfinite_updates_total") == 4
    assert registry.get_sample_value("streamvi_training_diverged") == 1
    assert loop.counts.updates_skipped == 4 and loop.counts.records_skipped == 16
    assert loop.counts.records_trained == 24
    assert good is not None and all(np.isfinite(v).all() for v in good)
    assert all(np.isfinite(v.numpy()).all() for v in loop.trainer.model.trainable_variables)


_SHARED: dict[str, Trainer] = {}


@settings(max_examples=300)
@given(st.lists(st.one_of(payloads, st.just(b"GOOD")), min_size=1, max_size=12))
def test_nothing_raises_out_of_the_loop_on_any_payload(tmp_path_factory, values):
    good = encode_record(np.full(DIM, 0.5, np.float32), "g", "json")
    stream = [RawRecord("in", 0, i, None, good if v == b"GOOD" else v) for i, v in enumerate(values)]
    if "trainer" not in _SHARED:  # one trainer for every example: compiling per example is too slow
        _SHARED["trainer"] = make_loop(
            MemorySource([]), MemorySink(), SnapshotStore(tmp_path_factory.mktemp("h"))
        ).trainer
    source, sink = MemorySource(stream), MemorySink()
    loop = make_loop(source, sink, SnapshotStore(tmp_path_factory.mktemp("h")), trainer=_SHARED["trainer"])
    loop.run(max_records=len(stream))
    latents = {orjson.loads(m.value)["offset"] for m in sink.on_topic("lat")}
    dead = {int(dict(m.headers)[HEADER_OFFSET]): dict(m.headers)[HEADER_REASON] for m in sink.on_topic("dlq")}
    assert latents.isdisjoint(dead) and latents | set(dead) == set(range(len(stream)))
    assert all(reason.decode() in DEAD_LETTER_REASONS for reason in dead.values())
    assert source.committed == {("in", 0): len(stream)}


def test_snapshot_lock_names_the_directory_and_the_holder(tmp_path):
    held = SnapshotStore(tmp_path).lock()
    try:
        with pytest.raises(SnapshotLockedError, match=f"{tmp_path}.*pid {os.getpid()}"):
            SnapshotStore(tmp_path).lock()
    finally:
        held.release()
    SnapshotStore(tmp_path).lock().release()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("processing.guarantee=twice", "processing.guarantee"),
        ("processing.max_nonfinite_in_a_row=0", "processing.max_nonfinite_in_a_row"),
        ("processing.shutdown_grace_seconds=-1", "processing.shutdown_grace_seconds"),
        ("processing.nonsense=1", "processing.nonsense"),
    ],
)
def test_bad_processing_settings_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(overrides=[override], environ={})


def test_transactional_id_defaults_to_the_group():
    settings = load_settings(overrides=["kafka.group_id=g1"], environ={})
    assert settings.processing.transactional_id_for(settings.kafka.group_id) == "g1-streamvi"


def test_a_rewind_answering_a_rebalance_logs_a_warning_and_a_failure_an_error(caplog):
    """Scaling a group rewinds its trainer workers every time: that is no error to page anyone on."""
    backoff = RewindBackoff(ProcessingPolicy(retry_initial_seconds=0.0, retry_max_seconds=0.0))
    rebalance = "partitions [('in', 0)] revoked by a rebalance"
    with caplog.at_level(logging.WARNING, logger="streamvi.stream.recovery"):
        backoff.begin_rewind(rebalance, "the last snapshot", routine=True)
        backoff.begin_rewind("outputs were not delivered: broker unreachable", "the last snapshot")
    assert [(r.levelno, r.getMessage().split(": ", 1)[1]) for r in caplog.records] == [
        (logging.WARNING, rebalance),
        (logging.ERROR, "outputs were not delivered: broker unreachable"),
    ]
    assert backoff.epoch == 2
