"""The daemon's loop on named-field events: breast-cancer measurements with values missing at random
and a categorical diagnosis. It learns, normalisation beats none, a restart resumes the normaliser
exactly, and the exported encoder on raw features equals ``streamvi encode``."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
import tensorflow as tf
from click.testing import CliRunner

from streamvi.cli.main import cli
from streamvi.config import load_settings
from streamvi.io.base import RawRecord
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.runtime import build_decoder, build_trainer, evaluation_policy, snapshot_meta
from streamvi.serving import export_saved_model
from streamvi.snapshots import SnapshotStore
from streamvi.snapshots.loading import find_snapshot
from streamvi.stream import CheckpointPolicy, OnlineLoop, OutputTopics
from tests.unit import feature_events

BASE = [
    "model.latent_dim=4",
    "model.encoder_hidden=[64]",
    "model.activation=elu",
    "training.learning_rate=0.005",
    "evaluation.heldout_fraction=0.1",
    "evaluation.every_steps=20",
    "evaluation.importance_samples=8",
]


def feature_settings(*overrides: str):
    schema = orjson.dumps(feature_events.schema()).decode()
    return load_settings(overrides=[f"input.features={schema}", *BASE, *overrides], environ={})


def run(settings, records, directory, trainer=None):
    """The online loop over ``records`` in memory, snapshots in ``directory``; (loop, sink)."""
    trainer = trainer or build_trainer(settings)
    sink = MemorySink()
    loop = OnlineLoop(
        source=MemorySource(records),
        sink=sink,
        decoder=build_decoder(settings),
        trainer=trainer,
        store=SnapshotStore(directory),
        topics=OutputTopics("lat", "met", "dlq"),
        policy=CheckpointPolicy(every_steps=10_000, every_seconds=3600),
        max_batch_latency_seconds=60.0,  # batches close by size only: the same boundaries every run
        evaluation=evaluation_policy(settings),
        snapshot_meta=snapshot_meta(settings),
    )
    info = loop.restore()
    resumed = info.offsets.get(("in", 0), 0) if info is not None else 0
    loop.run(max_records=len(records) - resumed)
    return loop, sink


def normaliser_state(trainer) -> list[np.ndarray]:
    moments = trainer.model.inputs.normaliser
    return [v.numpy() for v in (moments.records, moments.count, moments.mean, moments.m2)]


#: Small and quick: no XLA compile (the compiled step is the same computation).
QUICK = ["training.batch_size=32", "input.normalise_warmup=64", "training.jit_compile=false"]


def test_a_restart_resumes_the_normaliser_exactly_and_latents_say_what_was_observed(tmp_path):
    settings = feature_settings(*QUICK)
    events = feature_events.events()
    records = feature_events.records(events[:384])
    bad = orjson.dumps({"id": "bad", "mean": {"radius": "large"}})
    # in the second half, so that both runs close their batches at the same records (a dead
    # letter shifts the boundaries, and a float sum depends on how it is grouped)
    records[250] = RawRecord("in", 0, 250, b"bad", bad)

    whole, _ = run(settings, records, tmp_path / "whole")
    first, sink = run(settings, records[:192], tmp_path / "restart")
    saved = normaliser_state(first.trainer)
    snapshot = SnapshotStore(tmp_path / "restart").latest()
    assert snapshot is not None and snapshot.step == first.trainer.step > 0
    resumed_trainer = build_trainer(settings)
    second, second_sink = run(settings, records, tmp_path / "restart", resumed_trainer)
    # it resumed at the snapshot's offsets (the counts carry on from the snapshot's)
    counted = ("records_consumed", "records_trained", "dead_letters", "latents_published", "steps")
    assert all(getattr(second.counts, c) == getattr(whole.counts, c) for c in counted)
    assert resumed_trainer.step == whole.trainer.step

    # the snapshot holds the normaliser bit for bit; resumed, it ends where the unbroken run does
    check = build_trainer(settings)
    SnapshotStore(tmp_path / "restart").restore(tf.train.Checkpoint(**check.checkpoint_objects()), snapshot)
    for got, want in zip(normaliser_state(check), saved, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(normaliser_state(resumed_trainer), normaliser_state(whole.trainer), strict=True):
        np.testing.assert_array_equal(got, want)

    dead = second_sink.on_topic("dlq")
    assert len(dead) == 1 and dict(dead[0].headers)["streamvi.error.reason"] == b"wrong_type"
    latents = [orjson.loads(m.value) for m in sink.on_topic("lat")]
    assert len(latents) == 192 and all(math.isfinite(m["elbo"]) for m in latents)
    present = {
        e["id"]: sum(len(v) if isinstance(v, dict) else 1 for k, v in e.items() if k != "id")
        for e in events[:192]
    }
    assert all(m["observed"] == present[m["id"]] for m in latents)


def test_the_exported_encoder_on_raw_features_equals_streamvi_encode(tmp_path):
    settings = feature_settings(*QUICK)
    events = feature_events.events(seed=1)
    run(settings, feature_events.records(events[:160]), tmp_path / "snaps")
    info = find_snapshot(tmp_path / "snaps")
    target = export_saved_model(info, tmp_path / "export" / "1")

    sample = tmp_path / "events.jsonl"
    sample.write_bytes(b"\n".join(orjson.dumps(e) for e in events[160:260]) + b"\n")
    result = CliRunner().invoke(
        cli, ["encode", "--snapshot", str(tmp_path / "snaps"), "--input", str(sample)]
    )
    assert result.exit_code == 0, result.output
    encoded = [orjson.loads(line) for line in result.output.splitlines()]

    decoded = build_decoder(settings).decode_many(feature_events.records(events[160:260]))
    assert np.isnan(decoded.x).any()  # raw values with missing ones, as a client would send them
    served = tf.saved_model.load(str(target)).signatures["serving_default"](x=tf.constant(decoded.x))
    np.testing.assert_allclose(served["z_mean"].numpy(), [e["z_mean"] for e in encoded], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        served["z_scale"].numpy(), [e["z_scale"] for e in encoded], rtol=1e-4, atol=1e-5
    )
    assert [e["id"] for e in encoded] == [e["id"] for e in events[160:260]]
    assert all(0 < e["observed"] <= 31 for e in encoded)


@pytest.mark.slow
def test_it_learns_and_normalisation_reaches_a_better_heldout_elbo_than_none(tmp_path):
    events = feature_events.events()
    records = feature_events.records(events, passes=8)
    heldout: dict[str, list[float]] = {}
    final: dict[str, np.ndarray] = {}
    for arm, extra in (("normalised", ["input.normalise_warmup=256"]), ("raw", ["input.normalise=false"])):
        settings = feature_settings("training.batch_size=64", *extra)
        trainer = build_trainer(settings)
        evaluation = evaluation_policy(settings)
        assert evaluation is not None
        held = [i for i in range(len(events)) if evaluation.reservoir.selects(records[i])]
        x_held = build_decoder(settings).decode_many([records[i] for i in held]).x
        before = trainer.evaluate(x_held).bound
        _, sink = run(settings, records, tmp_path / arm, trainer)
        final[arm] = trainer.evaluate(x_held).bound
        gain = final[arm] - before
        assert gain.mean() > 5 * gain.std(ddof=1) / math.sqrt(len(gain))
        messages = [orjson.loads(m.value) for m in sink.on_topic("met")]
        heldout[arm] = [m["elbo"] for m in messages if m["kind"] == "heldout"]
    # after its warm-up the normalised model keeps improving on held-out records: the last of its
    # held-out ELBOs beats the first (at step 20) by more than 2 nats per record
    assert heldout["normalised"][-1] > heldout["normalised"][0] + 2.0, heldout
    # both bounds are densities of the same raw values in nats, so they compare directly; the
    # margin (100 nats per record) is far beyond the held-out mean's standard error (a few nats)
    assert final["normalised"].mean() > final["raw"].mean() + 100.0, {k: v.mean() for k, v in final.items()}
