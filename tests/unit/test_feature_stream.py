"""The daemon's loop on named-field events: breast-cancer measurements with values missing at random
and a categorical diagnosis. It learns, normalisation beats none, a restart resumes the normaliser
exactly, and the exported encoder on raw features equals ``streamvi encode``."""

from __future__ import annotations

import math

import fastavro
import numpy as np
import orjson
import pytest
import tensorflow as tf
from click.testing import CliRunner
from matplotlib.image import imread

from streamvi.cli.main import cli
from streamvi.config import load_settings
from streamvi.io.base import RawRecord
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.report import comparable
from streamvi.runtime import anomaly_monitor, build_decoder, build_trainer, evaluation_policy, snapshot_meta
from streamvi.serving import export_saved_model
from streamvi.snapshots import SnapshotStore
from streamvi.snapshots.loading import find_snapshot, load_trainer
from streamvi.snapshots.sample import load_sample
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


def run(settings, records, directory, trainer=None, anomaly=None):
    """The online loop over ``records`` in memory, snapshots in ``directory`` (with ``anomaly``, an
    anomaly monitor, flags go to the topic "anom"); (loop, sink)."""
    trainer = trainer or build_trainer(settings)
    sink = MemorySink()
    loop = OnlineLoop(
        source=MemorySource(records),
        sink=sink,
        decoder=build_decoder(settings),
        trainer=trainer,
        store=SnapshotStore(directory),
        topics=OutputTopics("lat", "met", "dlq", "anom" if anomaly is not None else None),
        policy=CheckpointPolicy(every_steps=10_000, every_seconds=3600),
        max_batch_latency_seconds=60.0,  # batches close by size only: the same boundaries every run
        evaluation=evaluation_policy(settings),
        snapshot_meta=snapshot_meta(settings),
        anomaly=anomaly,
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


def avro_snapshot(json_snapshots, directory, settings):
    """A snapshot holding the model of ``json_snapshots``'s newest, written under ``settings``
    (an Avro input): the same parameters, normaliser and RNG state, so encodings must agree."""
    info = find_snapshot(json_snapshots)
    _, trainer = load_trainer(info)
    kept = {k: v for k, v in info.meta.items() if k not in ("files", "step", "format_version", "config")}
    checkpoint = tf.train.Checkpoint(**trainer.checkpoint_objects())
    SnapshotStore(directory).write(checkpoint, info.step, {**kept, "config": settings.public_dict()})


def encode_output(snapshots, path) -> list[dict]:
    """The JSON lines ``streamvi encode`` writes for ``path`` under the newest of ``snapshots``."""
    result = CliRunner().invoke(cli, ["encode", "--snapshot", str(snapshots), "--input", str(path)])
    assert result.exit_code == 0, result.output
    return [orjson.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def json_snapshots(tmp_path_factory):
    """A snapshot of the JSON feature stream after 160 events."""
    directory = tmp_path_factory.mktemp("json-snapshots")
    run(feature_settings(*QUICK), feature_events.records(feature_events.events(seed=2)[:160]), directory)
    return directory


@pytest.mark.parametrize("wire_header", [False, True], ids=["bare", "wire-header"])
def test_encode_reads_an_avro_container_as_it_reads_the_same_events_as_json(
    tmp_path, json_snapshots, wire_header
):
    schema_file = tmp_path / "patient.avsc"
    schema_file.write_bytes(orjson.dumps(feature_events.avro_schema()))
    setting = (
        f"input.avro_schema_ids={{5: {schema_file}}}" if wire_header else f"input.avro_schema={schema_file}"
    )
    avro_settings = feature_settings(*QUICK, "input.format=avro", setting)
    avro_snapshot(json_snapshots, tmp_path / "avro", avro_settings)

    events = feature_events.events(seed=2)[160:260]
    as_json, as_avro = tmp_path / "events.jsonl", tmp_path / "events.avro"
    as_json.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    with as_avro.open("wb") as handle:
        fastavro.writer(handle, fastavro.parse_schema(feature_events.avro_schema()), events)

    want, got = encode_output(json_snapshots, as_json), encode_output(tmp_path / "avro", as_avro)
    assert [g["id"] for g in got] == [w["id"] for w in want] == [e["id"] for e in events]
    assert [g["observed"] for g in got] == [w["observed"] for w in want]
    assert min(w["observed"] for w in want) < 31  # some values are missing
    # the same rows, parameters and RNG state: equal to the bit in practice, float rounding allowed
    for key in ("z_mean", "z_scale", "elbo"):
        np.testing.assert_allclose([g[key] for g in got], [w[key] for w in want], rtol=1e-6, atol=1e-6)


def test_encode_names_the_avro_record_the_daemon_would_dead_letter(tmp_path, json_snapshots):
    features = feature_events.schema()
    features[0]["missing"] = "dead_letter"  # mean.radius
    schema = feature_events.avro_schema()
    schema_file = tmp_path / "patient.avsc"
    schema_file.write_bytes(orjson.dumps(schema))
    avro_settings = load_settings(
        overrides=[
            f"input.features={orjson.dumps(features).decode()}",
            *BASE,
            *QUICK,
            "input.format=avro",
            f"input.avro_schema={schema_file}",
        ],
        environ={},
    )
    avro_snapshot(json_snapshots, tmp_path / "avro", avro_settings)
    events = feature_events.events(missing=0.0)[:4]
    del events[2]["mean"]["radius"]
    container = tmp_path / "events.avro"
    with container.open("wb") as handle:
        fastavro.writer(handle, fastavro.parse_schema(schema), events)
    args = ["encode", "--snapshot", str(tmp_path / "avro"), "--input", str(container)]

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and result.stdout == ""
    assert f"{container}, record 3: missing_field: feature mean_radius (path mean.radius) is missing" in (
        result.stderr
    )

    # a file whose schema lacks a field the snapshot's schema requires (no default): named too
    without_id = {**schema, "fields": [f for f in schema["fields"] if f["name"] != "id"]}
    with container.open("wb") as handle:
        fastavro.writer(handle, fastavro.parse_schema(without_id), [{"diagnosis": "benign"}])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and result.stdout == ""
    assert f"{container}: record 1: " in result.stderr and "field id" in result.stderr

    # with schema ids, a file written in none of their schemas is refused as a whole
    ids_settings = feature_settings(
        *QUICK, "input.format=avro", f"input.avro_schema_ids={{5: {schema_file}}}"
    )
    avro_snapshot(json_snapshots, tmp_path / "ids", ids_settings)
    result = CliRunner().invoke(
        cli, ["encode", "--snapshot", str(tmp_path / "ids"), "--input", str(container)]
    )
    assert result.exit_code == 2 and "writer schema is none of input.avro_schema_ids" in result.stderr


def test_report_on_a_feature_schema_snapshot_draws_raw_events_on_one_scale(tmp_path, json_snapshots):
    info = find_snapshot(json_snapshots)
    sample = load_sample(info)
    assert sample is not None and len(sample[0]) > 0
    held = sample[0]
    assert np.isnan(held).any()  # the held-out sample keeps which values were not observed
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["report", "--snapshot", str(json_snapshots), "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = {"history.png", "latents.png", "reconstructions.png"}
    assert {p.name for p in out.iterdir()} == names
    assert f"encoded {len(held)} records from the snapshot's held-out sample" in result.output
    # the values not observed are marked (tab:red crosses) at their reconstructions
    pixels = (imread(out / "reconstructions.png")[..., :3] * 255).astype(int)
    assert np.count_nonzero(np.all(np.abs(pixels - (214, 39, 40)) <= 8, axis=-1)) > 20

    # drawn on one scale: the raw numerics span thousandths to thousands, the standardised ones
    # (by the snapshot's normaliser) a few units; what was not observed stays not observed
    _, trainer = load_trainer(info)
    numeric = trainer.model.inputs.layout.numeric
    drawn = comparable(trainer.model.inputs, held)
    assert np.nanmax(np.abs(held[:, numeric])) > 500 and np.nanmax(np.abs(drawn[:, numeric])) < 20
    np.testing.assert_array_equal(np.isnan(drawn), np.isnan(held))

    # raw events given with --input are read as `streamvi encode` reads them
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in feature_events.events(seed=4)[:50]))
    args = [
        "report",
        "--snapshot",
        str(json_snapshots),
        "--out",
        str(tmp_path / "given"),
        "--input",
        str(events),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "encoded 50 records from the input given" in result.output
    assert {p.name for p in (tmp_path / "given").iterdir()} == names


def test_the_normaliser_warm_up_is_scored_standardised_and_kept_out_of_the_anomaly_reference(tmp_path):
    """Its records are scored in the untrained model's order of nats (not raw units'), get no
    percentile, and none of their scores enters the reference."""
    settings = feature_settings(*QUICK, "anomaly.min_reference_records=10", "evaluation.every_steps=1000")
    events = feature_events.events(seed=2)
    records = feature_events.records(events[:320])
    monitor = anomaly_monitor(settings)
    assert monitor is not None
    _, sink = run(settings, records, tmp_path, anomaly=monitor)
    latents = sorted((orjson.loads(m.value) for m in sink.on_topic("lat")), key=lambda m: m["offset"])
    policy = evaluation_policy(settings)
    assert policy is not None
    held = np.array([policy.reservoir.selects(r) for r in records])
    # the warm-up ends once 64 trainable (not held-out) records are folded: batch by batch of 32
    batch_of = np.arange(len(records)) // 32
    trainable_before = np.array([(~held[batch_of < b]).sum() for b in batch_of])
    warm = trainable_before < 64
    assert 0 < warm.sum() < len(records)
    elbo = np.array([m["elbo"] for m in latents])
    # past the first batch (nothing folded yet) the warm-up's bounds are of the trained bounds' order
    first = batch_of == 0
    assert np.median(-elbo[warm & ~first]) < 10 * np.median(-elbo[~warm])
    assert all(m["anomaly_percentile"] is None for m, w in zip(latents, warm, strict=True) if w)
    assert any(m["anomaly_percentile"] is not None for m in latents)
    # the reference holds exactly the held-out records scored after the warm-up
    assert monitor.reference.records == int((held & ~warm).sum())
    steps = [orjson.loads(m.value) for m in sink.on_topic("met")]
    ready = [m["model_ready"] for m in steps if m["kind"] == "step"]
    assert ready == [not warm[b * 32] for b in range(len(ready))]
