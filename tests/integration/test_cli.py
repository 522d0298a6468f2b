"""The ``streamvi`` command as a user runs it: subprocesses, signals, files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import numpy as np
import orjson
import pytest

from streamvi.io.admin import ensure_topics
from streamvi.snapshots import SnapshotStore
from tests.integration.conftest import committed_offsets, produce_values, read_topic
from tests.integration.faultkit import ROOT, STREAMVI, cli_env
from tests.integration.test_daemon import digits_records

pytestmark = pytest.mark.integration


def test_run_stops_cleanly_on_sigterm_and_restart_replays_nothing(settings_factory):
    settings = settings_factory("snapshots.every_steps=100000", "snapshots.every_seconds=3600")
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    produce_values(bootstrap, kafka.input_topic, digits_records(0, 200))
    process = subprocess.Popen(
        [*STREAMVI, "run"], env=cli_env(settings), stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        metrics_url = None
        deadline = time.monotonic() + 60
        while metrics_url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if line.startswith("metrics: "):
                metrics_url = line.split(" ", 1)[1].strip()
        assert metrics_url, "the daemon never printed its metrics URL"
        consumed = 0.0
        while consumed < 200 and time.monotonic() < deadline:
            body = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
            for line in body.splitlines():
                if line.startswith("streamvi_records_consumed_total "):
                    consumed = float(line.split()[1])
            time.sleep(0.2)
        assert consumed == 200
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "this run consumed 200; totals: trained 200" in stderr
    # the final checkpoint happened: snapshot and committed offsets both cover all 200 records
    assert SnapshotStore(settings.snapshots.dir).latest().offsets == {(kafka.input_topic, 0): 200}
    assert committed_offsets(bootstrap, kafka.group_id) == {(kafka.input_topic, 0): 200}
    assert len(read_topic(bootstrap, kafka.latents_topic, 200)) == 200

    # a restart with nothing new consumes nothing and writes no new snapshot
    before = SnapshotStore(settings.snapshots.dir).candidates()
    result = subprocess.run(
        [*STREAMVI, "run", "--idle-timeout", "2"],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "this run consumed 0; totals: trained 200" in result.stderr
    assert SnapshotStore(settings.snapshots.dir).candidates() == before


def test_run_max_records_then_encode_and_snapshots_commands(settings_factory, tmp_path):
    settings = settings_factory()
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    produce_values(bootstrap, kafka.input_topic, digits_records(0, 96))
    env = cli_env(settings)
    result = subprocess.run(
        [*STREAMVI, "run", "--max-records", "96"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    latents = {m.key.decode(): orjson.loads(m.value) for m in read_topic(bootstrap, kafka.latents_topic, 96)}

    listing = subprocess.run(
        [*STREAMVI, "snapshots", "list"], env=env, capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0 and "step=3" in listing.stdout and "trained=96" in listing.stdout
    shown = subprocess.run(
        [*STREAMVI, "snapshots", "show"], env=env, capture_output=True, text=True, timeout=60
    )
    meta = json.loads(shown.stdout)
    assert meta["offsets"] == {kafka.input_topic: {"0": 96}} and meta["step"] == 3

    encoded = subprocess.run(
        [*STREAMVI, "encode", "--snapshot", str(settings.snapshots.dir), "--input", "digits"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert encoded.returncode == 0, encoded.stderr
    rows = [json.loads(line) for line in encoded.stdout.splitlines()]
    assert len(rows) == 1797 and all(len(r["z_mean"]) == 4 and len(r["z_scale"]) == 4 for r in rows)
    assert all(r["model_step"] == 3 for r in rows)
    assert {"id", "z_mean", "z_scale", "elbo", "bound"} <= set(rows[0])
    weighted = subprocess.run(
        [
            *STREAMVI,
            "encode",
            "--snapshot",
            str(settings.snapshots.dir),
            "--input",
            "digits",
            "--importance-samples",
            "16",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert weighted.returncode == 0, weighted.stderr
    estimates = [json.loads(line) for line in weighted.stdout.splitlines()]
    assert all(r["importance_samples"] == 16 for r in estimates)
    # IWAE-16 is a tighter bound than the one-sample ELBO on average
    assert np.mean([r["log_likelihood"] for r in estimates]) > np.mean([r["elbo"] for r in rows])
    # Published latents were scored before each update; the snapshot is the model after them all,
    # so the encodings differ, but they describe the same records and latent space.
    assert len(latents) == 96 and all(len(v["z_mean"]) == 4 for v in latents.values())


def test_config_commands(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMVI_")}
    env["STREAMVI_KAFKA__SASL_PASSWORD"] = "s3cret-value"
    shown = subprocess.run(
        [*STREAMVI, "--config", "configs/default.yaml", "--set", "training.batch_size=7", "config", "show"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "batch_size: 7" in shown.stdout
    assert "s3cret-value" not in shown.stdout and "**********" in shown.stdout
    bad = subprocess.run(
        [*STREAMVI, "--set", "training.batch_size=-1", "config", "validate"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert bad.returncode == 2 and "training.batch_size" in bad.stderr
    for command in (
        ["run"],
        ["produce"],
        ["demo"],
        ["encode"],
        ["report"],
        ["snapshots", "list"],
        ["snapshots", "export"],
        ["config", "show"],
    ):
        helped = subprocess.run([*STREAMVI, *command, "--help"], capture_output=True, text=True, timeout=60)
        assert helped.returncode == 0 and "Usage:" in helped.stdout


def test_produce_command_sends_a_file(settings_factory, tmp_path):
    settings = settings_factory()
    kafka = settings.kafka
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "x": [i / 10] * 64}) + "\n" for i in range(10)))
    result = subprocess.run(
        [*STREAMVI, "produce", "--dataset", str(data), "--format", "f32", "--no-progress", "--rate", "200"],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    messages = read_topic(kafka.bootstrap_servers[0], kafka.input_topic, 10)
    assert [m.key for m in messages] == [f"r{i}".encode() for i in range(10)]
    assert all(len(m.value) == 64 * 4 for m in messages)


def test_demo_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMVI_")}
    result = subprocess.run(
        [*STREAMVI, "--config", "configs/demo.yaml", "demo", "--passes", "2", "--workdir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    trained = int(re.search(r"trained on (\d+) records", result.stdout).group(1))
    held = int(re.search(r"held out \(never trained on\): (\d+) records", result.stdout).group(1))
    assert trained + held == 3594 and 0 < held < 0.15 * 3594  # configs/demo.yaml holds out ~5%
    assert "3 dead letters" in result.stdout
    assert "metrics: http://127.0.0.1:" in result.stdout
    assert SnapshotStore(tmp_path / "snapshots").latest().meta["counts"]["records_trained"] == trained
    plots = {"history.png", "latents.png", "reconstructions.png"}
    assert {p.name for p in (tmp_path / "report").iterdir()} == plots
    assert all((tmp_path / "report" / name).stat().st_size > 15_000 for name in plots)
    assert "plots: " in result.stdout
