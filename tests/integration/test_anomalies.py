"""Calibrated anomaly flags end to end on the embedded broker: a smooth low-dimensional stream with
injected outliers goes through the real daemon, and the latents' ``anomaly_percentile``/``anomaly``
fields, the anomalies topic, the metrics, the training counts and the snapshot's anomaly state are
checked against each other (at_least_once and exactly_once), then a restart resumes the reference."""

from __future__ import annotations

import collections
import signal
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from scipy import stats

from streamvi.anomaly.monitor import STATE_FILE, AnomalyMonitor
from streamvi.datasets import encode_record
from streamvi.io.admin import ensure_topics
from streamvi.io.base import RawRecord
from streamvi.runtime import build_daemon, evaluation_policy
from streamvi.snapshots import SnapshotStore
from tests.integration.conftest import produce_values
from tests.integration.faultkit import DaemonProcess, read_all, read_committed_emulated

pytestmark = pytest.mark.integration

DIM = 8
OUTLIER_FRACTION = 0.02
THRESHOLD_PERCENTILE = 99.0


def stream(start: int, count: int, seed: int) -> tuple[list[tuple[bytes, bytes]], set[int]]:
    """``count`` records: points near a closed curve in R^8 (a 1-D manifold, noise 0.05) and, with
    probability OUTLIER_FRACTION each, a point far off it (every coordinate +-3 or more). Returns the
    (key, value) items and the indices (from ``start``) of the outliers."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.0, 2.0 * np.pi, count)
    curve = np.stack(
        [
            np.sin(t),
            np.cos(t),
            0.5 * np.sin(2 * t),
            0.5 * np.cos(2 * t),
            0.3 * np.sin(3 * t),
            0.3 * np.cos(3 * t),
            0.5 * np.sin(t + 1.0),
            0.5 * np.cos(t - 0.5),
        ],
        axis=1,
    )
    x = curve + rng.normal(0.0, 0.05, size=curve.shape)
    outlier = rng.random(count) < OUTLIER_FRACTION
    far = rng.choice([-1.0, 1.0], size=(count, DIM)) * rng.uniform(3.0, 5.0, size=(count, DIM))
    x[outlier] = far[outlier]
    items = []
    for i in range(count):
        record_id = f"rec-{start + i:06d}"
        items.append((record_id.encode(), encode_record(x[i], record_id, "json")))
    return items, {start + i for i in np.flatnonzero(outlier).tolist()}


def anomaly_settings(settings_factory, *extra: str):
    # a topic of its own for the anomalies, named like the factory's other topics for this test
    suffix = settings_factory().kafka.input_topic.removeprefix("in-")
    return settings_factory(
        f"kafka.anomalies_topic=anomalies-{suffix}",
        f"input.dim={DIM}",
        "model.likelihood=gaussian",
        "model.latent_dim=2",
        "model.encoder_hidden=[32]",
        "training.batch_size=32",
        "training.pipeline_depth=2",
        "kafka.max_poll_records=256",
        "evaluation.heldout_fraction=0.2",
        "evaluation.every_steps=1000",
        "snapshots.every_steps=25",
        "anomaly.min_reference_records=50",
        "anomaly.window_records=200",
        f"anomaly.threshold_percentile={THRESHOLD_PERCENTILE}",
        # no drift adaptation: flagged records are never trained on, so the counts add up exactly
        "anomaly.drift_detector=none",
        *extra,
    )


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


@dataclass
class Run:
    counts: Any
    metrics: dict[str, float]
    heldout: set[int]  # offsets of the records in the held-out share
    snapshot_dir: Any


def run_to_end(settings, items: list[tuple[bytes, bytes]], first_offset: int = 0) -> Run:
    """The daemon (``Daemon.run``, in process) over ``len(items)`` records; /metrics is scraped
    after its final checkpoint, before it closes (and stops serving)."""
    kafka = settings.kafka
    registry = CollectorRegistry()
    daemon = build_daemon(settings, registry)
    reservoir = daemon.loop.evaluation.reservoir
    heldout = {
        first_offset + i
        for i, (key, _) in enumerate(items)
        if reservoir.selects(RawRecord(kafka.input_topic, 0, first_offset + i, key, None))
    }
    close = daemon.close
    daemon.close = lambda: None  # scrape first: Daemon.run closes (and stops /metrics) as it returns
    try:
        counts = daemon.run(max_records=len(items))
        assert daemon.metrics_url is not None
        metrics = scrape(daemon.metrics_url)
    finally:
        close()
    assert metrics["streamvi_anomalies_flagged_total"] == registry.get_sample_value(
        "streamvi_anomalies_flagged_total"
    )
    return Run(counts, metrics, heldout, settings.snapshots.dir)


def producer_batches(bootstrap: str, topic: str) -> set[tuple[int, int, bool]]:
    """(producer id, producer epoch, transactional) of every data batch of ``topic``, read back the
    way faultkit.read_committed_emulated reads the transaction markers."""
    from kafka.consumer import fetcher
    from kafka.record import MemoryRecords

    seen: set[tuple[int, int, bool]] = set()
    original = fetcher.Fetcher.PartitionRecords.__init__

    def spy(self: Any, fetch_offset: int, tp: Any, records: Any, *args: Any, **kwargs: Any) -> None:
        copy = MemoryRecords(bytes(records._buffer))
        batch = copy.next_batch()
        while batch is not None:
            if batch.magic == 2 and not batch.is_control_batch:
                seen.add((batch.producer_id, batch.producer_epoch, batch.is_transactional))
            batch = copy.next_batch()
        original(self, fetch_offset, tp, records, *args, **kwargs)

    fetcher.Fetcher.PartitionRecords.__init__ = spy
    try:
        read_all(bootstrap, topic, quiet_seconds=1.0)
    finally:
        fetcher.Fetcher.PartitionRecords.__init__ = original
    return seen


def read_outputs(settings, expected_latents: int) -> tuple[list[Any], list[Any]]:
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    read = read_committed_emulated if settings.processing.guarantee == "exactly_once" else read_all
    latents = read(bootstrap, kafka.latents_topic, expected=expected_latents)
    flagged = sum(orjson.loads(m.value)["anomaly"] for m in latents)
    anomalies = read(bootstrap, kafka.anomalies_topic, expected=flagged) if flagged else []
    return latents, anomalies


def check_anomaly_outputs(settings, items, outliers: set[int], run: Run, latents, anomalies) -> dict:
    """What both guarantees must show; returns figures for the guarantee-specific checks."""
    kafka = settings.kafka
    n = len(items)
    keys = {offset: key for offset, (key, _) in enumerate(items)}
    payloads = [orjson.loads(m.value) for m in latents]
    for message, payload in zip(latents, payloads, strict=True):
        assert "anomaly_percentile" in payload and "anomaly" in payload, payload
        assert isinstance(payload["anomaly"], bool)
        assert message.key == keys[payload["offset"]]
    # one latent per record (duplicates, if any, carry the same record)
    by_offset: dict[int, dict] = {}
    for payload in payloads:
        by_offset.setdefault(payload["offset"], payload)
    assert set(by_offset) == set(range(n))

    # calibration: null until the reference holds min_reference_records held-out scores, then
    # always a float in [0, 100] (the reference never shrinks: no drift detector)
    percentiles = [by_offset[o]["anomaly_percentile"] for o in range(n)]
    first = next(i for i, p in enumerate(percentiles) if p is not None)
    assert all(p is None for p in percentiles[:first])
    assert all(isinstance(p, float) and 0.0 <= p <= 100.0 for p in percentiles[first:])
    # the reference is the held-out share, fed batch by batch after each is judged: the first
    # calibrated batch comes right after the batch that brought it to min_reference_records
    heldout_before = len([o for o in run.heldout if o < first])
    minimum = settings.anomaly.min_reference_records
    assert minimum <= heldout_before < minimum + settings.training.batch_size, heldout_before
    assert first < n // 3, first  # calibration happened early in the run
    assert not any(by_offset[o]["anomaly"] for o in range(first))  # no flag before calibration

    flagged = {o for o, p in by_offset.items() if p["anomaly"]}
    anomaly_payloads = [orjson.loads(m.value) for m in anomalies]
    anomaly_positions = collections.Counter((p["partition"], p["offset"]) for p in anomaly_payloads)
    assert set(anomaly_positions) == {(0, o) for o in flagged}
    for message, payload in zip(anomalies, anomaly_payloads, strict=True):
        offset = payload["offset"]
        latent = by_offset[offset]
        assert message.key == keys[offset]
        assert payload["id"] == message.key.decode() == latent["id"]
        assert payload["topic"] == kafka.input_topic and payload["partition"] == 0
        assert payload["bound"] == latent["bound"] == "elbo"
        assert payload["model_step"] == latent["model_step"]
        assert payload["threshold_percentile"] == THRESHOLD_PERCENTILE
        # the latents message writes its numbers as float32, the anomalies message the same float32
        # value as a double: equal as float32
        assert np.float32(payload["elbo"]) == np.float32(latent["elbo"])
        assert payload["anomaly_percentile"] is not None
        assert np.float32(payload["anomaly_percentile"]) == np.float32(latent["anomaly_percentile"])
        assert payload["elbo"] < payload["threshold_elbo"]

    # The outliers are what gets flagged. Were flags blind to outlier status, the outliers among F
    # flagged records would be about Binomial(F, share of outliers after calibration); the observed
    # count must lie far in that distribution's upper tail.
    calibrated = set(range(first, n))
    outliers_calibrated = outliers & calibrated
    flagged_outliers = flagged & outliers
    share = len(outliers_calibrated) / len(calibrated)
    assert len(flagged) > 0
    p_value = stats.binom.sf(len(flagged_outliers) - 1, len(flagged), share)
    precision = len(flagged_outliers) / len(flagged)
    recall = len(flagged_outliers) / len(outliers_calibrated)
    assert p_value < 1e-12, (len(flagged_outliers), len(flagged), share)
    # Precision: the reference is the held-out share's prequential scores, exchangeable with every
    # record's (the share is a key hash), and it lags a model that improves, so at most ~1% of the
    # ~2,700 normal records are flagged (~27, Poisson 99.9% bound ~45); with at least a quarter of
    # the ~55 outliers flagged (~14), precision is at least ~14/59 > 0.2, ten times the base rate.
    assert precision >= 10 * share, (precision, len(flagged_outliers), len(flagged))
    assert recall >= 0.25, (recall, len(flagged_outliers), len(outliers_calibrated))

    # metrics and counts agree with the topics
    counts = run.counts
    flagged_trainable = flagged - run.heldout
    assert run.metrics["streamvi_anomalies_flagged_total"] == len(flagged) == counts.anomalies_flagged
    assert run.metrics["streamvi_flagged_records_not_trained_total"] == len(flagged_trainable)
    assert counts.flagged_not_trained == len(flagged_trainable) > 0
    assert counts.updates_skipped == 0 and counts.dead_letters == 0 and counts.drifts_detected == 0
    assert counts.records_consumed == n
    # every record is trained on, held out, or flagged and left out: nothing else
    assert counts.records_trained + counts.flagged_not_trained + len(run.heldout) == counts.records_consumed
    snapshot = SnapshotStore(run.snapshot_dir).latest()
    assert snapshot.offsets == {(kafka.input_topic, 0): n}
    saved = snapshot.meta["counts"]
    assert saved["flagged_not_trained"] == counts.flagged_not_trained
    assert saved["anomalies_flagged"] == len(flagged)
    assert (
        saved["records_trained"] + saved["flagged_not_trained"] + len(run.heldout)
        == saved["records_consumed"]
    )

    # the flag is decided against the reference when the batch was submitted, the percentile
    # against the reference when it finished: count where the two disagree
    disagree = sum(
        (p["anomaly_percentile"] > THRESHOLD_PERCENTILE) != p["anomaly"]
        for o, p in by_offset.items()
        if o >= first
    )
    return {
        "latents": len(latents),
        "distinct_latents": len(by_offset),
        "anomaly_messages": len(anomalies),
        "distinct_anomalies": len(anomaly_positions),
        "duplicate_anomalies": sum(c - 1 for c in anomaly_positions.values()),
        "duplicate_latents": len(latents) - len(by_offset),
        "flagged": len(flagged),
        "flagged_outliers": len(flagged_outliers),
        "outliers_after_calibration": len(outliers_calibrated),
        "precision": round(precision, 3),
        "recall": round(recall, 3),
        "first_calibrated_offset": first,
        "flag_percentile_disagreements": disagree,
        "anomaly_positions": anomaly_positions,
    }


RECORDS = 3000


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_flags_follow_the_reference_and_reach_the_anomalies_topic(settings_factory, guarantee):
    settings = anomaly_settings(settings_factory, f"processing.guarantee={guarantee}")
    kafka = settings.kafka
    ensure_topics(kafka)
    items, outliers = stream(0, RECORDS, seed=7)
    produce_values(kafka.bootstrap_servers[0], kafka.input_topic, items)
    run = run_to_end(settings, items)
    latents, anomalies = read_outputs(settings, RECORDS)
    figures = check_anomaly_outputs(settings, items, outliers, run, latents, anomalies)
    positions = figures.pop("anomaly_positions")
    print(f"\n{guarantee}: {figures}")
    if guarantee == "exactly_once":
        # read_committed: every flagged latent has exactly one anomalies message, and vice versa
        assert figures["duplicate_latents"] == 0
        assert max(positions.values()) == 1
        assert figures["anomaly_messages"] == figures["flagged"]
        # written by the transactional producer that writes the latents, inside its transactions
        bootstrap = kafka.bootstrap_servers[0]
        anomaly_producers = producer_batches(bootstrap, kafka.anomalies_topic)
        latent_producers = producer_batches(bootstrap, kafka.latents_topic)
        assert anomaly_producers and all(transactional for _, _, transactional in anomaly_producers)
        assert anomaly_producers <= latent_producers
    else:
        # a clean run replays nothing, even at-least-once (the duplicates are counted above)
        assert figures["duplicate_anomalies"] == figures["duplicate_latents"] == 0


def test_the_snapshot_keeps_the_reference_and_a_restart_is_calibrated_at_once(settings_factory):
    # One window holds the whole reference here: with two, every percentile and threshold is read
    # from a fresh merge of the windows, and a KLL merge that compacts is random (a coin flip per
    # compaction), so the exact values could not be recomputed from anomaly.json.
    window = "anomaly.window_records=1000"
    settings = anomaly_settings(settings_factory, window)
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    first_items, _ = stream(0, 1500, seed=11)
    produce_values(bootstrap, kafka.input_topic, first_items)
    first_run = run_to_end(settings, first_items)

    snapshot = SnapshotStore(settings.snapshots.dir).latest()
    assert snapshot is not None and STATE_FILE in snapshot.meta["files"]
    assert len(snapshot.meta["files"][STATE_FILE]) == 64  # a sha256, verified by SnapshotStore
    saved = AnomalyMonitor(settings.anomaly)
    saved.load((snapshot.path / STATE_FILE).read_bytes())
    restored_records = saved.reference.records
    assert restored_records == len(first_run.heldout)  # every held-out score, none lost
    assert saved.reference.state()["previous"] is None

    # Restart needing as many reference scores as the snapshot holds: more than the restarted run
    # adds in all (its held-out share), so only the restored sketch can calibrate its first batch.
    more = 400
    restarted = anomaly_settings(
        settings_factory, window, f"anomaly.min_reference_records={restored_records}"
    )
    second_items, _ = stream(len(first_items), more, seed=12)
    produce_values(bootstrap, kafka.input_topic, second_items)
    registry = CollectorRegistry()
    daemon = build_daemon(restarted, registry)
    assert daemon.restored is not None and daemon.restored.path == snapshot.path
    reservoir = daemon.loop.evaluation.reservoir
    heldout = sum(
        reservoir.selects(RawRecord(kafka.input_topic, 0, len(first_items) + i, key, None))
        for i, (key, _) in enumerate(second_items)
    )
    assert restored_records > heldout, (restored_records, heldout)
    reference = daemon.loop.anomaly.reference
    assert reference.records == restored_records and reference.calibrated
    # before the first batch, the restored reference is the saved one, sketch for sketch
    assert reference.state() == saved.reference.state()
    assert reference.threshold_elbo(THRESHOLD_PERCENTILE) == saved.reference.threshold_elbo(
        THRESHOLD_PERCENTILE
    )
    counts = daemon.run(max_records=more)
    assert counts.records_consumed == len(first_items) + more  # the counts are restored too
    assert registry.get_sample_value("streamvi_records_consumed_total") == more

    latents = [
        orjson.loads(m.value)
        for m in read_all(bootstrap, kafka.latents_topic, expected=len(first_items) + more)
    ]
    new = sorted((p for p in latents if p["offset"] >= len(first_items)), key=lambda p: p["offset"])
    assert [p["offset"] for p in new] == list(range(len(first_items), len(first_items) + more))
    assert all(isinstance(p["anomaly_percentile"], float) for p in new)
    # the first batch's percentiles are those of the saved sketch (it is judged before any score of
    # the restarted run is added): recompute them from anomaly.json
    first_batch = [p for p in new if p["model_step"] == new[0]["model_step"]][: restarted.training.batch_size]
    expected = saved.reference.percentiles(np.array([p["elbo"] for p in first_batch], dtype=np.float32))
    assert expected is not None
    got = np.array([p["anomaly_percentile"] for p in first_batch], dtype=np.float32)
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_exactly_once_a_killed_daemon_leaves_one_anomaly_per_committed_flag(settings_factory, tmp_path):
    """SIGKILL mid-stream under exactly_once, then a restart to the end: a read_committed consumer
    sees each record's latent once and an anomalies message exactly for the flagged ones, and the
    last snapshot's counts agree with what is visible."""
    settings = anomaly_settings(
        settings_factory, "processing.guarantee=exactly_once", "snapshots.every_steps=5"
    )
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    n = 6000
    items, outliers = stream(0, n, seed=23)
    produce_values(bootstrap, kafka.input_topic, items)
    victim = DaemonProcess(settings, tmp_path / "victim.log")
    try:
        victim.wait_for_metrics()
        victim.wait_for("streamvi_anomalies_flagged_total", 5, timeout=120)
        victim.wait_for("streamvi_records_consumed_total", n // 3, timeout=120)
        consumed_at_kill = victim.sample("streamvi_records_consumed_total")
        victim.signal(signal.SIGKILL)
    finally:
        victim.wait(30)
    assert consumed_at_kill < n, "the input was finished before the kill: nothing was tested"
    final = DaemonProcess(settings, tmp_path / "final.log", "--idle-timeout", "3")
    assert final.wait(300) == 0, final.log_text()[-3000:]

    latents = read_committed_emulated(bootstrap, kafka.latents_topic, expected=n)
    payloads = [orjson.loads(m.value) for m in latents]
    offsets = collections.Counter(p["offset"] for p in payloads)
    assert set(offsets) == set(range(n)) and max(offsets.values()) == 1
    flagged = {p["offset"] for p in payloads if p["anomaly"]}
    anomalies = read_committed_emulated(bootstrap, kafka.anomalies_topic, expected=len(flagged))
    positions = collections.Counter(orjson.loads(m.value)["offset"] for m in anomalies)
    assert set(positions) == flagged and max(positions.values()) == 1
    assert len(flagged & outliers) >= 0.5 * len(flagged)
    snapshot = SnapshotStore(settings.snapshots.dir).latest()
    assert snapshot.offsets == {(kafka.input_topic, 0): n}
    saved = snapshot.meta["counts"]
    # the visible outputs and the restored counts agree, records consumed included (a snapshot
    # counts what its offsets cover, also one taken inside a fetch that the restart read again)
    heldout = evaluation_policy(settings).reservoir
    held = {
        i
        for i, (key, _) in enumerate(items)
        if heldout.selects(RawRecord(kafka.input_topic, 0, i, key, None))
    }
    assert saved["records_consumed"] == n
    assert saved["latents_published"] == n and saved["anomalies_flagged"] == len(flagged)
    assert saved["flagged_not_trained"] == len(flagged - held)
    assert saved["records_trained"] + saved["flagged_not_trained"] + len(held) == n
    written = len(read_all(bootstrap, kafka.latents_topic, expected=n))
    written_anomalies = len(read_all(bootstrap, kafka.anomalies_topic, expected=len(flagged)))
    print(
        f"\nkilled after {consumed_at_kill:.0f} records; latents written {written}, visible {n}; "
        f"anomalies written {written_anomalies}, visible {len(flagged)} ({len(flagged & outliers)} outliers)"
    )
