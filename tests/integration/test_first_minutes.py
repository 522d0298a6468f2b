"""What a new user sees first: the daemon's opening log lines, and the consumer lag on /metrics."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
import urllib.request

import pytest
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamvi.cli.logs import drop_native_noise
from streamvi.io.admin import ensure_topics
from streamvi.runtime import build_daemon
from tests.integration.conftest import produce_values
from tests.integration.faultkit import ROOT, STREAMVI, cli_env
from tests.integration.test_daemon import digits_records

pytestmark = pytest.mark.integration

#: What the first lines of a daemon's log must not be: TensorFlow's and absl's native start-up
#: lines, the CUDA probe of a machine without a GPU, and the Kafka client's own warnings.
NOISE = re.compile(
    r"absl::InitializeLog|cudart_stub|cuInit|cuda_|blocking the event loop|Sync listeners block"
    r"| (?:WARNING|INFO|DEBUG) (?:kafka|absl|tensorflow)\b|^[IWE]\d{4} "
)


def _without_quieting(env: dict[str, str]) -> dict[str, str]:
    """As a user's shell has it: no TF_CPP_MIN_LOG_LEVEL, the GPU probe free to run."""
    return {k: v for k, v in env.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")}


def _noise(stderr: str) -> list[str]:
    return [
        line
        for line in stderr.splitlines()
        if NOISE.search(line) or (line.strip() and not drop_native_noise(line))
    ]


def test_tensorflow_start_up_prints_nothing_by_default(tmp_path):
    """``snapshots list`` imports TensorFlow (streamvi/snapshots/store.py does, at the top), and so
    probes for a GPU, and needs no broker."""
    env = _without_quieting(dict(os.environ))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [*STREAMVI, "snapshots", "list", "--dir", str(tmp_path)],
        env={k: v for k, v in env.items() if not k.startswith("STREAMVI_")},
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode == 0 and "no snapshots in" in result.stdout, result.stderr
    assert result.stderr == "", result.stderr


@pytest.mark.slow
def test_run_log_opens_with_what_the_daemon_does_and_no_library_noise(settings_factory):
    settings = settings_factory("snapshots.every_steps=100000")
    kafka = settings.kafka
    ensure_topics(kafka)
    produce_values(kafka.bootstrap_servers[0], kafka.input_topic, digits_records(0, 64))
    env = _without_quieting(cli_env(settings))
    result = subprocess.run(
        [*STREAMVI, "run", "--max-records", "64"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert not _noise(result.stderr), "\n".join(_noise(result.stderr))
    # the first lines say broker, topics, model, device; then whether a snapshot was restored
    opening = "\n".join(lines[:4])
    assert f"broker {kafka.bootstrap_servers[0]} (kafka-python, PLAINTEXT)" in lines[0], opening
    assert f"topics: input {kafka.input_topic} (json, 64 values)" in lines[1], opening
    assert "model: gaussian z of 4, encoder [64, 32]" in lines[2] and "estimator sgvb_b" in lines[2], opening
    assert re.search(r"device: (CPU|/GPU:0) \(", lines[3]), opening
    snapshot = [i for i, line in enumerate(lines) if "snapshot: " in line and "checkpoint" not in line]
    assert snapshot and "snapshot: none in" in lines[snapshot[0]], result.stderr
    first_checkpoint = next(i for i, line in enumerate(lines) if "checkpoint (" in line)
    assert snapshot[0] < first_checkpoint
    assert "this run consumed 64" in result.stderr


def _scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_consumer_lag_is_exported_from_the_first_fetch_after_assignment(settings_factory, caplog):
    """Lag is computed every metrics.lag_interval_seconds; here that is an hour, so only the prompt
    computation after an assignment can export it. Partition 1 stays empty: its lag is known (0)
    from the consumer's position and the high-water mark, with no record from it. (And the log
    says whether a snapshot was restored.)"""
    caplog.set_level(logging.INFO, logger="streamvi")
    settings = settings_factory(
        "kafka.topic_partitions=2", "metrics.lag_interval_seconds=3600", "snapshots.every_steps=100000"
    )
    kafka = settings.kafka
    ensure_topics(kafka)
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers[0], acks="all")
    try:
        for key, value in digits_records(0, 40):
            producer.send(kafka.input_topic, key=key, value=value, partition=0)
        producer.flush()
    finally:
        producer.close()
    caplog.clear()
    daemon = build_daemon(settings, CollectorRegistry())
    stop = threading.Event()
    runner = threading.Thread(target=daemon.run, kwargs={"stop": stop}, daemon=True)
    runner.start()
    try:
        assert daemon.metrics_url
        deadline = time.monotonic() + 90
        lag: dict[str, float] = {}
        consumed = 0.0
        while time.monotonic() < deadline and not (consumed == 40 and set(lag) == {"0", "1"}):
            samples = _scrape(daemon.metrics_url)
            consumed = samples["streamvi_records_consumed"][0].value
            lag = {s.labels["partition"]: s.value for s in samples.get("streamvi_consumer_lag_records", [])}
            time.sleep(0.1)
        assert consumed == 40 and set(lag) == {"0", "1"}
        # partition 0: from the first fetch (its records may have come in more than one)
        assert 0 <= lag["0"] <= 40 and lag["1"] == 0
    finally:
        stop.set()
        runner.join(timeout=60)
    assert not runner.is_alive()
    # the daemon's first lines: broker, topics, model, device, anomalies, then whether a snapshot
    # was restored
    opening = [r.getMessage() for r in caplog.records if r.name.startswith("streamvi")][:7]
    assert opening[0].startswith(f"streamvi 0.1.0: broker {kafka.bootstrap_servers[0]}"), opening
    assert opening[1].startswith(f"topics: input {kafka.input_topic} (json, 64 values)"), opening
    assert opening[2].startswith("model: gaussian z of 4, encoder [64, 32]"), opening
    assert opening[3].startswith("device: "), opening
    assert opening[4].startswith("anomalies: flagged past the 99th percentile"), opening
    assert any(line.startswith("snapshot: none in") for line in opening[5:]), opening
    again = build_daemon(settings, CollectorRegistry())
    again.close()
    assert re.search(r"snapshot: restored snapshot-\d+-\d+ at step 2, resuming at offsets", caplog.text)
