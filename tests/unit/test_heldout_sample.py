"""The held-out sample a snapshot keeps: bounded, inside the checksums, restored into the reservoir."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamvi.config import load_settings
from streamvi.errors import ConfigError, CorruptSnapshotError
from streamvi.io.codecs import RecordDecoder
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.metrics import Health, Metrics
from streamvi.report import write_report
from streamvi.runtime import build_trainer
from streamvi.snapshots import SnapshotStore
from streamvi.snapshots.sample import SAMPLE_FILE, load_sample
from streamvi.stream import CheckpointPolicy, EvaluationPolicy, OnlineLoop
from streamvi.training.heldout import HeldOutReservoir
from tests.unit.test_loop import TOPICS, records
from tests.unit.test_trainer import data

DIM = 6


def make_loop(records_, store: SnapshotStore, sample_records: int) -> OnlineLoop:
    settings = load_settings(
        overrides=[
            f"input.dim={DIM}",
            "model.latent_dim=2",
            "model.encoder_hidden=[8]",
            "training.batch_size=4",
        ],
        environ={},
    )
    loop = OnlineLoop(
        source=MemorySource(records_),
        sink=MemorySink(),
        decoder=RecordDecoder("json", DIM, 4096),
        trainer=build_trainer(settings),
        store=store,
        topics=TOPICS,
        policy=CheckpointPolicy(every_steps=3, every_seconds=3600),
        max_batch_latency_seconds=5.0,
        metrics=Metrics(CollectorRegistry()),
        health=Health(),
        snapshot_meta={"config": settings.public_dict()},
        evaluation=EvaluationPolicy(
            HeldOutReservoir(0.5, 10, DIM),
            every_steps=1000,
            importance_samples=2,
            snapshot_sample_records=sample_records,
        ),
    )
    loop.restore()
    return loop


def test_snapshots_keep_the_newest_heldout_records_inside_their_checksums(tmp_path):
    stream = records(60)
    store = SnapshotStore(tmp_path)
    loop = make_loop(stream, store, sample_records=3)
    loop.run(max_records=60)
    assert loop.evaluation is not None
    held = [r.offset for r in stream if loop.evaluation.reservoir.selects(r)]
    assert len(held) > 3  # the bound matters
    latest = store.latest()
    assert latest is not None and SAMPLE_FILE in latest.meta["files"]
    sample = load_sample(latest)
    assert sample is not None
    x, c = sample
    np.testing.assert_array_equal(x, data(60, dim=DIM)[held[-3:]].astype(np.float32))
    assert c.shape == (3, 0)

    # covered by the snapshot's checksums: a damaged sample makes the snapshot corrupt
    path = latest.path / SAMPLE_FILE
    original = path.read_bytes()
    path.write_bytes(original[:-8] + bytes(8))
    with pytest.raises(CorruptSnapshotError, match=SAMPLE_FILE):
        store.verify(latest.path)
    path.write_bytes(original)

    # a restart resumes the held-out evaluation with them, and its next snapshot keeps them
    restarted = make_loop(records(60), SnapshotStore(tmp_path), sample_records=3)
    assert restarted.evaluation is not None
    kept_x, _ = restarted.evaluation.reservoir.contents()
    np.testing.assert_array_equal(kept_x, x)


def test_no_sample_when_the_setting_is_zero_and_the_report_says_so(tmp_path):
    store = SnapshotStore(tmp_path / "snapshots")
    make_loop(records(20), store, sample_records=0).run(max_records=20)
    latest = store.latest()
    assert latest is not None and SAMPLE_FILE not in latest.meta["files"] and load_sample(latest) is None
    report = write_report(latest, tmp_path / "report")
    assert [p.name for p in report.files] == ["history.png"] and report.records_encoded == 0


def test_the_sample_size_is_a_checked_setting():
    assert load_settings(environ={}).snapshots.sample_records == 256
    with pytest.raises(ConfigError, match=r"snapshots\.sample_records"):
        load_settings(overrides=["snapshots.sample_records=-1"], environ={})
