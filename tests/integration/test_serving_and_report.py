"""A daemon trained on the embedded broker, then what users build on it: live /metrics against the
dashboard and alert rules, the SavedModel export for TF Serving, and the PNG report."""

from __future__ import annotations

import json
import re
import struct
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamvi.cli.main import cli
from streamvi.config import load_settings
from streamvi.datasets import load_digits
from streamvi.errors import StreamVIError
from streamvi.io.admin import ensure_topics
from streamvi.report import write_report
from streamvi.runtime import build_daemon
from streamvi.serving import export_saved_model
from streamvi.snapshots.loading import find_snapshot, load_trainer
from streamvi.snapshots.sample import load_sample
from tests.integration.conftest import produce_values
from tests.integration.test_daemon import digits_records

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RECORDS = 640
BAD = [b"{not json", b'{"x": [1.0]}']


@pytest.fixture(scope="module")
def trained(broker, tmp_path_factory):
    """Settings, snapshot directory and the /metrics text scraped from the live daemon after its run."""
    workdir = tmp_path_factory.mktemp("trained")
    suffix = uuid.uuid4().hex[:8]
    settings = load_settings(
        overrides=[
            f"kafka.bootstrap_servers={broker.bootstrap_servers}",
            f"kafka.input_topic=in-{suffix}",
            f"kafka.latents_topic=latents-{suffix}",
            f"kafka.metrics_topic=metrics-{suffix}",
            f"kafka.dead_letter_topic=dlq-{suffix}",
            f"kafka.group_id=group-{suffix}",
            "kafka.topic_partitions=2",
            "kafka.session_timeout_ms=6000",
            "kafka.heartbeat_interval_ms=1000",
            f"snapshots.dir={workdir / 'snapshots'}",
            "snapshots.every_steps=5",
            "metrics.port=0",
            "metrics.lag_interval_seconds=0.2",
            "model.latent_dim=4",
            "model.encoder_hidden=[64, 32]",
            "training.batch_size=32",
            "training.learning_rate=0.005",
            "training.max_batch_latency_ms=100",
        ],
        environ={},
    )
    ensure_topics(settings.kafka)
    produce_values(
        broker.bootstrap_servers,
        settings.kafka.input_topic,
        digits_records(0, RECORDS // 2)
        + [(None, v) for v in BAD]
        + digits_records(RECORDS // 2, RECORDS // 2),
    )
    daemon = build_daemon(settings, CollectorRegistry())
    try:
        daemon.loop.run(max_records=RECORDS + len(BAD))
        with urllib.request.urlopen(daemon.metrics_url, timeout=5) as response:
            metrics_text = response.read().decode()
    finally:
        daemon.close()
    return settings, settings.snapshots.dir, metrics_text


@pytest.fixture(scope="module")
def served(trained):
    """The /metrics text of an encoder replica that encoded the trained daemon's input with its
    snapshots (the replica's own metrics: model served, reloads, records encoded)."""
    import threading

    from streamvi.replica import build_replica

    settings, _, _ = trained
    replica = build_replica(settings, CollectorRegistry())
    try:
        model = replica.watcher.wait_for_first(threading.Event())
        assert model is not None
        replica.loop = replica._loop(model)
        replica.loop.run(max_records=RECORDS + len(BAD))
        with urllib.request.urlopen(replica.metrics_url, timeout=5) as response:
            return response.read().decode()
    finally:
        replica.close()


def streamvi(*args: str):
    """The ``streamvi`` command in this process (the TensorFlow start-up is paid once)."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# -- dashboards and alerts query only what a running daemon exports -----------------------------
def exported_series(metrics_text: str) -> set[str]:
    return {
        sample.name for family in text_string_to_metric_families(metrics_text) for sample in family.samples
    }


def queried_metrics() -> dict[str, set[str]]:
    import yaml

    names: dict[str, set[str]] = {}
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in re.findall(r"\bstreamvi_[a-z0-9_]+", rule["expr"]):
                names.setdefault(name, set()).add(f"alert {rule['alert']}")
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/streamvi.json").read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [("variable " + v["name"], v["query"]["query"]) for v in dashboard["templating"]["list"]]
    for where, expr in queries:
        for name in re.findall(r"\bstreamvi_[a-z0-9_]+", expr):
            names.setdefault(name, set()).add(f"panel {where}")
    return names


def test_dashboard_and_alerts_query_only_metrics_the_daemon_exports(trained, served):
    _, _, metrics_text = trained
    exported = exported_series(metrics_text) | exported_series(served)  # trainer and replica
    queried = queried_metrics()
    assert len(queried) >= 15
    missing = {name: sorted(where) for name, where in queried.items() if name not in exported}
    assert not missing, f"queried but not exported: {missing}"
    replica = {f.name: f for f in text_string_to_metric_families(served)}
    assert replica["streamvi_records_encoded"].samples[0].value == RECORDS
    assert replica["streamvi_model_step"].samples[0].value == find_snapshot(trained[1]).step
    assert 0 <= replica["streamvi_snapshot_age_seconds"].samples[0].value < 600
    # the labelled series the panels group by are there with their labels
    families = {f.name: f for f in text_string_to_metric_families(metrics_text)}
    lag = families["streamvi_consumer_lag_records"].samples
    assert {s.labels["partition"] for s in lag} == {"0", "1"}
    dead = {s.labels["reason"]: s.value for s in families["streamvi_dead_letters"].samples}
    assert dead["invalid_json"] == 1 and dead["wrong_length"] == 1
    assert any(
        s.name == "streamvi_step_duration_seconds_bucket"
        for s in families["streamvi_step_duration_seconds"].samples
    )
    assert families["streamvi_last_snapshot_timestamp_seconds"].samples[0].value > 0


# -- serving export ------------------------------------------------------------------------------
def test_saved_model_serving_default_matches_the_daemons_encodings(trained, tmp_path):
    _, snapshots, _ = trained
    info = find_snapshot(snapshots)
    target = tmp_path / "models" / "streamvi" / str(info.step)
    result = streamvi("snapshots", "export", str(snapshots), "--saved-model", str(target))
    assert result.exit_code == 0, result.output
    assert f"step {info.step}" in result.output
    assert (target / "saved_model.pb").is_file() and (target / "variables").is_dir()

    loaded = tf.saved_model.load(str(target))
    serve = loaded.signatures["serving_default"]
    _, inputs = serve.structured_input_signature
    assert set(inputs) == {"x"} and inputs["x"].shape.as_list() == [None, 64]
    assert set(serve.structured_outputs) == {"z_mean", "z_scale"}

    x = load_digits().x[:300]
    outputs = serve(x=tf.constant(x))
    _, trainer = load_trainer(info)
    scores = trainer.evaluate(x)  # the code path of the latents topic and `streamvi encode`
    np.testing.assert_allclose(outputs["z_mean"].numpy(), scores.z_loc, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outputs["z_scale"].numpy(), scores.z_scale, rtol=1e-4, atol=1e-5)
    assert outputs["z_mean"].shape == (300, 4) and np.all(outputs["z_scale"].numpy() > 0)
    # any batch size, including one record
    single = serve(x=tf.constant(x[:1]))
    np.testing.assert_allclose(single["z_mean"].numpy(), scores.z_loc[:1], rtol=1e-4, atol=1e-5)
    exported = json.loads((target / "assets.extra" / "streamvi_export.json").read_text())
    assert exported["model_step"] == info.step and exported["summary_size"] == 4

    with pytest.raises(StreamVIError, match="--overwrite"):
        export_saved_model(info, target)
    export_saved_model(info, target, overwrite=True)
    assert tf.saved_model.load(str(target)).signatures["serving_default"](x=tf.constant(x[:2]))


# -- report --------------------------------------------------------------------------------------
def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def png_distinct_colours(path: Path) -> int:
    from matplotlib.image import imread

    pixels = imread(path)
    return len(np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0))


def test_report_writes_history_latent_space_and_reconstructions(trained, tmp_path):
    _, snapshots, _ = trained
    info = find_snapshot(snapshots)
    history = info.meta["history"]
    assert history["step"] == list(range(1, info.step + 1)), "every step so far is in the snapshot"
    out = tmp_path / "report"
    result = streamvi("report", "--snapshot", str(snapshots), "--out", str(out), "--input", "digits")
    assert result.exit_code == 0, result.output
    names = {"history.png", "latents.png", "reconstructions.png"}
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        width, height = png_size(out / name)
        assert width >= 600 and height >= 300, name
        assert (out / name).stat().st_size > 15_000, f"{name} looks empty"
        assert zlib.crc32((out / name).read_bytes()) != 0
    # ten digit classes in ten colours on the latent plot; grey levels in the reconstructions
    assert png_distinct_colours(out / "latents.png") >= 20
    assert png_distinct_colours(out / "reconstructions.png") >= 50

    # the snapshot alone: the held-out records it keeps give the latent map and the reconstructions
    alone = tmp_path / "alone"
    result = streamvi("report", "--snapshot", str(snapshots), "--out", str(alone))
    assert result.exit_code == 0, result.output
    assert {p.name for p in alone.iterdir()} == names
    sample = load_sample(info)
    assert sample is not None and 0 < len(sample[0]) <= 256
    assert f"encoded {len(sample[0])} records from the snapshot's held-out sample" in result.output
    assert png_distinct_colours(alone / "latents.png") >= 20  # coloured by each record's ELBO
    assert png_distinct_colours(alone / "reconstructions.png") >= 50
    from_snapshot = write_report(info, tmp_path / "h")
    assert from_snapshot.records_encoded == len(sample[0]) and from_snapshot.history_points == info.step


def test_report_functions_handle_any_latent_and_input_dimension(tmp_path):
    from streamvi.report import plot_latents, plot_reconstructions

    rng = np.random.default_rng(0)
    for dim in (1, 2, 5):
        path = plot_latents(rng.normal(size=(50, dim)), rng.integers(0, 3, 50), tmp_path / f"z{dim}.png")
        assert png_size(path)[0] >= 600
    path = plot_latents(rng.normal(size=(50, 3)), None, tmp_path / "unlabelled.png")
    assert path.stat().st_size > 10_000
    x = rng.uniform(size=(6, 10))  # 10 is not a square: drawn as profiles
    path = plot_reconstructions(x, x * 0.9, tmp_path / "profiles.png")
    assert png_distinct_colours(path) >= 10


def test_snapshots_show_summarises_the_history_unless_full(trained):
    _, snapshots, _ = trained
    info = find_snapshot(snapshots)
    short = json.loads(streamvi("snapshots", "show", str(info.path)).output)
    assert short["history"]["points"] == info.step and short["history"]["steps"] == [1, info.step]
    full = json.loads(streamvi("snapshots", "show", "--full", str(info.path)).output)
    assert full["history"]["step"] == list(range(1, info.step + 1))
    assert len(full["history"]["elbo"]) == info.step
