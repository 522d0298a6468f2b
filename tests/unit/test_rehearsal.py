"""The rehearsal window and the trainer's rehearsal updates.

What is checked: the window is a ring of the last trained rows and draws only rows it holds, evenly;
only rows that were trained on enter it (held-out rows and rows under the training floor never do);
a step makes its rehearsal updates after taking its prequential scores, and they are reported, in
the step's result, on the metrics topic and in Prometheus; a snapshot holds the window, so a restore
continues bit for bit; and rehearsal learns a stream seen once faster than one update per batch.
Bad rehearsal settings are in tests/unit/test_config.py's table.
"""

from __future__ import annotations

import math

import numpy as np
import orjson
import tensorflow as tf
from prometheus_client import CollectorRegistry

from streamvi.io.memory import MemorySink, MemorySource
from streamvi.snapshots import SnapshotStore
from streamvi.stream import OnlineLoop
from streamvi.training.rehearsal import RehearsalWindow
from tests.unit.test_anomaly_training import rows_of, run_loop, stream
from tests.unit.test_loop import make_loop, records
from tests.unit.test_trainer import data, make, variables

REHEARSAL = ["training.rehearsal_window_records=32", "training.rehearsal_steps=3"]


def held_rows(window: RehearsalWindow) -> np.ndarray:
    return window.rows.numpy()[: int(window.held.numpy())]


def test_the_window_is_a_ring_of_the_kept_rows_in_order():
    window = RehearsalWindow(capacity=5, width=2)
    first = np.arange(8, dtype=np.float32).reshape(4, 2)  # rows 0..3
    window.add(tf.constant(first), tf.constant([True, False, True, True]))
    np.testing.assert_array_equal(held_rows(window), first[[0, 2, 3]])
    second = 100 + np.arange(8, dtype=np.float32).reshape(4, 2)
    window.add(tf.constant(second), tf.constant([True, True, True, False]))
    # five slots: 0, 2, 3 and then 100.., 102.. fill it; 104.. overwrites the oldest (row 0)
    assert int(window.held.numpy()) == 5 and int(window.next_slot.numpy()) == 1
    np.testing.assert_array_equal(window.rows.numpy()[:5], np.stack([second[2], *first[[2, 3]], *second[:2]]))
    assert not any((held_rows(window) == second[3]).all(axis=1))  # a row not kept is never held


def test_draws_come_evenly_from_the_held_rows_only():
    window = RehearsalWindow(capacity=64, width=1)
    window.add(tf.constant([[1.0], [2.0], [3.0], [9.0]]), tf.constant([True, True, True, False]))
    n = 30_000
    drawn = window.draw(n, tf.constant([1, 2], tf.int32)).numpy()[:, 0]
    assert set(np.unique(drawn)) == {1.0, 2.0, 3.0}
    # each held row with probability 1/3: a 5-sigma binomial band
    sigma = math.sqrt(n * (1 / 3) * (2 / 3))
    for value in (1.0, 2.0, 3.0):
        assert abs((drawn == value).sum() - n / 3) < 5 * sigma


def test_only_rows_trained_on_enter_the_window():
    trainer = make(*REHEARSAL)
    x = data(8)
    weights = np.array([1, 1, 0, 1, 0, 1, 1, 1], np.float32)  # two held out
    bound = make(*REHEARSAL).train_rows(rows_of(trainer, x, weights), 8).scores.bound
    floor = float(np.sort(bound[weights > 0])[1])  # the lowest trainable row falls under the floor
    result = trainer.train_rows(rows_of(trainer, x, weights), 8, floor=floor)
    kept = (weights > 0) & (bound >= floor)
    assert result.trained_records == kept.sum() == 5
    assert trainer.rehearsal is not None
    np.testing.assert_array_equal(held_rows(trainer.rehearsal)[:, :6], x[kept])


def test_rehearsal_follows_the_prequential_scores_and_is_reported():
    plain, rehearsed = make(), make(*REHEARSAL)
    x = data(8)
    a, b = plain.train(x.copy(), 8), rehearsed.train(x.copy(), 8)
    # the same seed and parameters: the scores are taken before any update, rehearsal's included
    np.testing.assert_array_equal(a.scores.bound, b.scores.bound)
    assert (a.rehearsal_updates, b.rehearsal_updates) == (0, 3)
    # one step counted; four updates applied (the step's and three rehearsed)
    assert rehearsed.step == 1 and int(rehearsed.optimizer.iterations.numpy()) == 4
    assert any(not np.array_equal(p, q) for p, q in zip(variables(plain), variables(rehearsed), strict=True))


def test_a_batch_that_trains_nothing_neither_fills_the_window_nor_rehearses():
    trainer = make(*REHEARSAL)
    trainer.train(data(8), 8)
    before, window = variables(trainer), trainer.rehearsal.rows.numpy().copy()
    result = trainer.train_rows(rows_of(trainer, data(8, seed=1), np.zeros(8, np.float32)), 8)
    assert result.rehearsal_updates == 0 and int(trainer.rehearsal.held.numpy()) == 8
    np.testing.assert_array_equal(trainer.rehearsal.rows.numpy(), window)
    for p, q in zip(before, variables(trainer), strict=True):
        np.testing.assert_array_equal(p, q)
    assert trainer.warm_up() >= 0 and int(trainer.rehearsal.held.numpy()) == 8


def test_a_restored_trainer_rehearses_as_the_original_would(tmp_path):
    original = make(*REHEARSAL)
    for seed in range(3):
        original.train(data(8, seed=seed), 8)
    tf.train.Checkpoint(**original.checkpoint_objects()).write(str(tmp_path / "ckpt"))
    restored = make(*REHEARSAL)
    tf.train.Checkpoint(**restored.checkpoint_objects()).read(str(tmp_path / "ckpt")).assert_consumed()
    np.testing.assert_array_equal(restored.rehearsal.rows.numpy(), original.rehearsal.rows.numpy())
    for seed in range(3, 6):
        a, b = original.train(data(8, seed=seed), 8), restored.train(data(8, seed=seed), 8)
        np.testing.assert_array_equal(a.scores.bound, b.scores.bound)
    for p, q in zip(variables(original), variables(restored), strict=True):
        np.testing.assert_array_equal(p, q)


def test_rehearsal_learns_a_stream_seen_once_faster():
    """Two binary prototypes (log p(x) = log 1/2 at best), 20 batches seen once: rehearsal closes
    more of the gap to the best bound than one update per batch. Both runs share every seed."""
    rng = np.random.default_rng(1)
    prototypes = (rng.random((2, 6)) < 0.5).astype(np.float32)
    x = prototypes[rng.integers(0, 2, size=160)]
    test = prototypes[rng.integers(0, 2, size=400)]
    ends = {}
    runs = {"plain": [], "rehearsed": ["training.rehearsal_window_records=64", "training.rehearsal_steps=8"]}
    for name, overrides in runs.items():
        trainer = make("training.learning_rate=0.01", *overrides)
        for i in range(0, 160, 8):
            trainer.train(x[i : i + 8].copy(), 8)
        ends[name] = float(trainer.evaluate(test).bound.mean())
    start = float(make().evaluate(test).bound.mean())
    best = math.log(0.5)
    plain_closed = (ends["plain"] - start) / (best - start)
    rehearsed_closed = (ends["rehearsed"] - start) / (best - start)
    # the plain run closes under half of the gap in 20 steps; nine times the updates, over 3/4
    assert plain_closed < 0.5 < 0.75 < rehearsed_closed, (start, ends)


def test_the_loop_reports_rehearsal_on_the_metrics_topic_and_in_prometheus(tmp_path):
    registry = CollectorRegistry()
    n = 640
    _, counts, sink = run_loop(tmp_path, stream(n, np.zeros(n, bool)), *REHEARSAL, registry=registry)
    steps = [m for m in map(orjson.loads, (m.value for m in sink.on_topic("met"))) if m.get("kind") == "step"]
    rehearsed = sum(m["rehearsal_updates"] for m in steps)
    assert counts.records_trained > 0 and rehearsed == 3 * sum(1 for m in steps if m["trained_records"])
    assert registry.get_sample_value("streamvi_rehearsal_updates_total") == rehearsed


def rehearsing_loop(source: MemorySource, store: SnapshotStore) -> OnlineLoop:
    """test_loop's loop, rehearsing, with one batch in flight and no checkpoint before the end."""
    rehearsal = ["training.rehearsal_window_records=16", "training.rehearsal_steps=2"]
    return make_loop(source, MemorySink(), store, every_steps=1000, pipeline_depth=1, overrides=rehearsal)


def test_a_restarted_daemon_rehearses_from_its_snapshots_window(tmp_path):
    """The loop's snapshot holds the window: stopping after 24 records and restarting from the
    snapshot ends with the parameters and window of one run through all 40, bit for bit."""
    stream_40 = records(40)
    whole = rehearsing_loop(MemorySource(stream_40), SnapshotStore(tmp_path / "whole"))
    whole.run(max_records=40)
    rehearsing_loop(MemorySource(stream_40[:24]), SnapshotStore(tmp_path / "split")).run(max_records=24)
    resumed = rehearsing_loop(MemorySource(stream_40), SnapshotStore(tmp_path / "split"))
    assert int(resumed.trainer.rehearsal.held.numpy()) == 16  # the window came back with it
    resumed.run(max_records=16)
    assert resumed.trainer.step == whole.trainer.step == 10
    np.testing.assert_array_equal(
        resumed.trainer.rehearsal.rows.numpy(), whole.trainer.rehearsal.rows.numpy()
    )
    for p, q in zip(variables(resumed.trainer), variables(whole.trainer), strict=True):
        np.testing.assert_array_equal(p, q)
