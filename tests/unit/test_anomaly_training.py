"""Flagged records left out of the update, drift responses, tags, and the loop's anomaly outputs.

The training floor is checked against a known answer: a step whose floor leaves some rows out makes
exactly the update of the same step with those rows' weights set to zero.
"""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from streamvi.anomaly.monitor import STATE_FILE, AnomalyMonitor
from streamvi.anomaly.responses import RaiseLearningRate, ResetOptimizer
from streamvi.config import load_settings
from streamvi.datasets import encode_record
from streamvi.io.base import RawRecord
from streamvi.io.codecs import RecordDecoder
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.metrics import Health, Metrics
from streamvi.runtime import anomaly_monitor, evaluation_policy
from streamvi.snapshots import SnapshotStore
from streamvi.snapshots.store import read_tags
from streamvi.stream import CheckpointPolicy, OnlineLoop, OutputTopics
from tests.unit.test_trainer import data, make, variables


def rows_of(trainer, x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    rows = np.zeros((trainer.batch_size, trainer.row_width), np.float32)
    rows[:, : x.shape[1]] = x
    rows[:, -1] = weights
    return rows


def test_rows_below_the_floor_make_the_update_of_the_same_rows_with_zero_weight():
    x = data(8)
    probe = make()
    bound = probe.train_rows(rows_of(probe, x, np.ones(8, np.float32)), 8).scores.bound
    floor = float(np.median(bound))
    below = bound < floor
    assert 0 < below.sum() < 8
    floored, zeroed = make(), make()  # same seed: the same parameters and draws as the probe's
    result = floored.train_rows(rows_of(floored, x, np.ones(8, np.float32)), 8, floor=floor)
    reference = zeroed.train_rows(rows_of(zeroed, x, (~below).astype(np.float32)), 8)
    np.testing.assert_array_equal(result.scores.bound, bound)  # scored before the update, as ever
    assert result.trained_records == 8 - below.sum() == reference.trained_records
    assert result.excluded_records == below.sum() and reference.excluded_records == 0
    for a, b in zip(variables(floored), variables(zeroed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_batch_whose_every_row_is_below_the_floor_counts_a_step_but_changes_nothing():
    trainer = make()
    before = variables(trainer)
    result = trainer.train_rows(rows_of(trainer, data(8), np.ones(8, np.float32)), 8, floor=math.inf)
    assert result.trained and result.trained_records == 0 and result.excluded_records == 8
    assert result.step == trainer.step == 1
    for a, b in zip(before, variables(trainer), strict=True):
        np.testing.assert_array_equal(a, b)
    # the floor goes back to -inf for the next batch: it trains on every row again
    again = trainer.train_rows(rows_of(trainer, data(8, seed=1), np.ones(8, np.float32)), 8)
    assert again.trained_records == 8 and again.excluded_records == 0


def test_reset_optimizer_zeroes_the_moments_and_keeps_the_parameters():
    trainer = make()
    trainer.train(data(8), 8)
    params = variables(trainer)
    change = ResetOptimizer().on_drift(trainer)
    assert change is not None
    change()
    assert all(not np.any(v.numpy()) for v in trainer.optimizer.variables)
    for a, b in zip(params, variables(trainer), strict=True):
        np.testing.assert_array_equal(a, b)
    assert trainer.optimizer.learning_rate.numpy() == pytest.approx(1e-3)


def test_raise_learning_rate_for_n_steps_then_back():
    trainer = make()
    response = RaiseLearningRate(factor=4.0, steps=3)
    change = response.on_drift(trainer)
    assert change is not None and response.active
    change()
    assert trainer.optimizer.learning_rate.numpy() == pytest.approx(4e-3)
    assert response.after_step(trainer) is None and response.after_step(trainer) is None
    restore = response.after_step(trainer)
    assert restore is not None and not response.active
    restore()
    assert trainer.optimizer.learning_rate.numpy() == pytest.approx(1e-3)


def test_tagged_snapshots_survive_pruning(tmp_path):
    import tensorflow as tf

    store = SnapshotStore(tmp_path, keep=2)
    checkpoint = tf.train.Checkpoint(v=tf.Variable(1.0))
    first = store.write(checkpoint, 1, {})
    store.tag(first, "pre-drift", {"detected_at_step": 5})
    for step in range(2, 6):
        store.write(checkpoint, step, {})
    names = [p.name for p in store.candidates()]
    assert len(names) == 3 and first.path.name in names
    assert read_tags(first.path)[0]["tag"] == "pre-drift"
    assert store.verify(first.path).step == 1  # a tag changes nothing that is verified
    from click.testing import CliRunner

    from streamvi.cli.main import cli

    listed = CliRunner().invoke(cli, ["snapshots", "list", "--dir", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    lines = {line.split()[0]: line for line in listed.output.splitlines()}
    assert lines[first.path.name].endswith("tags=pre-drift")
    assert sum("tags=" in line for line in lines.values()) == 1


# -- the loop ------------------------------------------------------------------------------------------
DIM = 6
#: The model of the loop tests (the trainer's and a replica's), and a reference that calibrates early.
MODEL = [
    f"input.dim={DIM}",
    "model.latent_dim=2",
    "model.encoder_hidden=[16]",
    "model.likelihood=gaussian",
    "model.learn_observation_scale=true",
    "training.batch_size=32",
]
REFERENCE = ["anomaly.min_reference_records=50", "anomaly.window_records=200"]


def stream(n: int, outliers: np.ndarray, seed: int = 0) -> list[RawRecord]:
    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(0.5, 0.05, size=(n, DIM)), 0, 1).astype(np.float32)
    x[outliers] = rng.random((int(outliers.sum()), DIM)).astype(np.float32)
    return [RawRecord("in", 0, i, f"k{i}".encode(), encode_record(x[i], f"r{i}", "json")) for i in range(n)]


def run_loop(tmp_path, records, *overrides: str, registry=None):
    settings = load_settings(
        overrides=[
            *MODEL,
            "training.learning_rate=0.01",
            "evaluation.heldout_fraction=0.2",
            *REFERENCE,
            *overrides,
        ],
        environ={},
    )
    from streamvi.runtime import build_trainer

    sink = MemorySink()
    loop = OnlineLoop(
        source=MemorySource(records),
        sink=sink,
        decoder=RecordDecoder("json", DIM, 4096),
        trainer=build_trainer(settings),
        store=SnapshotStore(tmp_path),
        topics=OutputTopics("lat", "met", "dlq", "anom"),
        policy=CheckpointPolicy(every_steps=20, every_seconds=3600),
        max_batch_latency_seconds=5.0,
        metrics=Metrics(registry or CollectorRegistry()),
        health=Health(),
        max_poll_records=64,
        evaluation=evaluation_policy(settings),
        anomaly=anomaly_monitor(settings),
    )
    loop.restore()
    counts = loop.run(max_records=len(records))
    return loop, counts, sink


@pytest.mark.parametrize("train_on_flagged", [False, True])
def test_flagged_records_are_published_and_trained_on_only_when_configured(tmp_path, train_on_flagged):
    n = 4000
    outliers = np.random.default_rng(9).random(n) < 0.02
    _, counts, sink = run_loop(
        tmp_path, stream(n, outliers), f"anomaly.train_on_flagged={str(train_on_flagged).lower()}"
    )
    latents = [orjson.loads(m.value) for m in sink.on_topic("lat")]
    anomalies = [orjson.loads(m.value) for m in sink.on_topic("anom")]
    flagged = {m["offset"] for m in latents if m["anomaly"]}
    assert all("anomaly_percentile" in m and "anomaly" in m for m in latents)
    assert [m["offset"] for m in anomalies] == sorted(flagged) and counts.anomalies_flagged == len(flagged)
    assert all(m["elbo"] < m["threshold_elbo"] for m in anomalies)
    # a batch's flags and percentiles come from the one reference its thresholds were frozen from
    calibrated = [m for m in latents if m["anomaly_percentile"] is not None]
    disagree = [m for m in calibrated if m["anomaly"] != (m["anomaly_percentile"] > 99.0)]
    assert len(disagree) <= 0.002 * len(calibrated), disagree[:3]
    percentiles = [m["anomaly_percentile"] for m in latents if m["anomaly_percentile"] is not None]
    assert len(percentiles) > n / 2 and all(0.0 <= p <= 100.0 for p in percentiles)
    # Once the model has learned the stream (the second half), the injected outliers (2% of it)
    # make up most of what is flagged and most of them are flagged. Without any signal, flags
    # would pick records at random: about 2% of them outliers, and about 1% of the outliers.
    late = {o for o in flagged if o >= n // 2}
    late_outliers = int(outliers[n // 2 :].sum())
    flagged_outliers = sum(bool(outliers[o]) for o in late)
    assert flagged_outliers / max(1, len(late)) > 0.5 and flagged_outliers > 0.5 * late_outliers
    heldout = n - counts.records_trained - counts.flagged_not_trained
    if train_on_flagged:
        assert counts.flagged_not_trained == 0
    else:
        # every flagged record that was trainable was left out of the update
        assert counts.flagged_not_trained > 0
        assert counts.flagged_not_trained <= len(flagged)
    assert 0.15 * n < heldout < 0.25 * n  # the held-out share, never trained on either way


def test_each_heldout_evaluation_refreshes_the_reference_with_the_current_scores(tmp_path, monkeypatch):
    refreshed: list[int] = []
    original = AnomalyMonitor.refresh

    def spy(self, elbo):
        refreshed.append(len(elbo))
        original(self, elbo)

    monkeypatch.setattr(AnomalyMonitor, "refresh", spy)
    n = 1600
    _, _, sink = run_loop(
        tmp_path, stream(n, np.zeros(n, bool)), "evaluation.every_steps=10", "evaluation.heldout_capacity=100"
    )
    evaluations = [
        m for m in map(orjson.loads, (m.value for m in sink.on_topic("met"))) if m["kind"] == "heldout"
    ]
    assert len(refreshed) == len(evaluations) >= 3
    assert refreshed == [e["records"] for e in evaluations] and refreshed[-1] == 100


def test_the_snapshot_keeps_the_anomaly_state_and_a_restart_restores_it(tmp_path):
    n = 1200
    loop, _, _ = run_loop(tmp_path, stream(n, np.zeros(n, bool)))
    info = SnapshotStore(tmp_path).latest()
    assert info is not None and STATE_FILE in info.meta["files"]
    assert loop.anomaly is not None
    saved = AnomalyMonitor(loop.anomaly.settings)
    saved.load((info.path / STATE_FILE).read_bytes())
    assert saved.reference.records == loop.anomaly.reference.records > 50
    # a restart resumes with the reference: its first batch already has percentiles
    more = stream(n + 64, np.zeros(n + 64, bool), seed=1)[n:]
    _, _, sink = run_loop(tmp_path, more, "anomaly.min_reference_records=100")
    first = orjson.loads(sink.on_topic("lat")[0].value)
    assert first["offset"] == n and first["anomaly_percentile"] is not None


def test_a_drift_is_reported_tagged_and_answered(tmp_path):
    n_before, n_after = 2500, 2500
    rng = np.random.default_rng(5)
    before = np.clip(rng.normal(0.3, 0.05, size=(n_before, DIM)), 0, 1)
    after = np.clip(rng.normal(0.8, 0.05, size=(n_after, DIM)), 0, 1)
    x = np.concatenate([before, after]).astype(np.float32)
    records = [
        RawRecord("in", 0, i, f"k{i}".encode(), encode_record(x[i], f"r{i}", "json")) for i in range(len(x))
    ]
    registry = CollectorRegistry()
    loop, counts, sink = run_loop(
        tmp_path,
        records,
        "anomaly.drift_response=raise_learning_rate",
        "anomaly.learning_rate_steps=10",
        "anomaly.drift_warmup_records=100",
        registry=registry,
    )
    drifts = [m for m in map(orjson.loads, (m.value for m in sink.on_topic("met"))) if m["kind"] == "drift"]
    assert counts.drifts_detected == len(drifts) >= 1
    first = drifts[0]
    assert first["response"] == "raise_learning_rate" and first["tagged_snapshot"] is not None
    tags = read_tags(SnapshotStore(tmp_path).directory / first["tagged_snapshot"])
    assert tags and tags[0]["tag"] == "pre-drift"
    assert registry.get_sample_value("streamvi_drift_detected_total") == len(drifts)
    assert registry.get_sample_value("streamvi_last_drift_timestamp_seconds") > 0
    # the detection falls after the switch (steps of 32 records, a fifth of them held out)
    latents = [orjson.loads(m.value) for m in sink.on_topic("lat")]
    step_of_switch = next(m["model_step"] for m in latents if m["offset"] == n_before)
    assert first["step"] >= step_of_switch
    # the learning rate was raised and put back after its 10 steps
    assert loop.trainer.optimizer.learning_rate.numpy() == pytest.approx(0.01)


def test_an_encoder_replica_scores_against_the_reference_of_the_snapshot_it_serves(tmp_path):
    from streamvi.runtime import build_trainer
    from streamvi.snapshots.trust import DurableTrust
    from streamvi.snapshots.watcher import SnapshotWatcher
    from streamvi.stream import EncoderLoop

    n = 3000
    outliers = np.random.default_rng(11).random(n) < 0.02
    records = stream(n, outliers)
    loop, _, _ = run_loop(tmp_path, records)
    settings = loop.anomaly.settings if loop.anomaly is not None else None
    assert settings is not None
    info = SnapshotStore(tmp_path).latest()
    assert info is not None
    config = load_settings(overrides=[*MODEL, *REFERENCE], environ={})
    watch = SnapshotWatcher(
        SnapshotStore(tmp_path),
        DurableTrust(),
        lambda: build_trainer(config),
        None,
        3600.0,
        build_anomaly=lambda: anomaly_monitor(config, learns=False),
    )
    import threading

    first = watch.wait_for_first(threading.Event())
    assert first is not None and first.anomaly is not None
    sink = MemorySink()
    replica = EncoderLoop(
        source=MemorySource(stream(1000, outliers[-1000:], seed=12)),
        sink=sink,
        decoder=RecordDecoder("json", DIM, 4096),
        watcher=watch,
        model=first,
        topics=OutputTopics("lat", "met", "dlq", "anom"),
        policy=CheckpointPolicy(every_steps=2**62, every_seconds=3600),
        max_batch_latency_seconds=5.0,
        max_poll_records=64,
    )
    replica.run(max_records=1000)
    out = [orjson.loads(m.value) for m in sink.on_topic("lat")]
    saved = AnomalyMonitor(first.anomaly.settings)
    saved.load((info.path / STATE_FILE).read_bytes())
    elbo = np.array([m["elbo"] for m in out])
    expected = saved.reference.percentiles(elbo)
    got = np.array([m["anomaly_percentile"] for m in out], dtype=float)
    assert expected is not None and np.max(np.abs(got - expected)) <= 100 * saved.reference.rank_error
    assert first.anomaly.reference.records == saved.reference.records  # a replica never adds to it
    flagged = [m for m in out if m["anomaly"]]
    anomalies = [orjson.loads(m.value) for m in sink.on_topic("anom")]
    assert flagged and [a["offset"] for a in anomalies] == [m["offset"] for m in flagged]
    assert {a["snapshot"] for a in anomalies} == {info.name}
    threshold = saved.reference.threshold_elbo(settings.threshold_percentile)
    assert all(a["threshold_elbo"] == pytest.approx(threshold, abs=1e-3) for a in anomalies)


def test_explanations_name_the_input_that_makes_a_record_unlikely(tmp_path):
    n = 2000
    rng = np.random.default_rng(13)
    x = np.clip(rng.normal(0.5, 0.05, size=(n, DIM)), 0, 1).astype(np.float32)
    broken = rng.random(n) < 0.03
    x[broken, 3] = 3.0  # one input far off where the rest of the record is normal
    records = [
        RawRecord("in", 0, i, f"k{i}".encode(), encode_record(x[i], f"r{i}", "json")) for i in range(n)
    ]
    # a short reference window: on a stream this short the model outgrows a longer one
    _, _, sink = run_loop(tmp_path, records, "anomaly.explain_top_k=2", "anomaly.window_records=50")
    latents = [orjson.loads(m.value) for m in sink.on_topic("lat")]
    assert all(len(m["explanation"]) == 2 for m in latents)
    assert all(
        m["explanation"][0]["log_likelihood"] <= m["explanation"][1]["log_likelihood"] for m in latents
    )
    late = [m for m in latents if m["offset"] >= n // 2 and broken[m["offset"]]]
    named = sum(m["explanation"][0]["feature"] == "x[3]" for m in late)
    assert late and named == len(late)
    anomalies = [orjson.loads(m.value) for m in sink.on_topic("anom")]
    assert anomalies and all(len(a["explanation"]) == 2 for a in anomalies)
