from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamvi.metrics import Health, Metrics, MetricsServer


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def served():
    registry = CollectorRegistry()
    metrics, health = Metrics(registry), Health()
    metrics.set_build_info({"streamvi": "0.1.0", "tensorflow": "x"})
    server = MetricsServer(registry, health, "127.0.0.1", 0).start()
    yield metrics, health, f"http://127.0.0.1:{server.port}"
    server.stop()


def test_metrics_endpoint_serves_prometheus_text(served):
    metrics, _, base = served
    metrics.records_consumed.inc(5)
    metrics.dead_letters.labels(reason="invalid_json").inc()
    status, body = get(base + "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert families["streamvi_records_consumed"].samples[0].value == 5
    assert {s.labels["reason"] for s in families["streamvi_dead_letters"].samples} >= {
        "invalid_json",
        "non_finite",
    }
    assert families["streamvi_build_info"].samples[0].labels["streamvi"] == "0.1.0"
    assert "streamvi_step_duration_seconds" in families


def test_health_endpoints_follow_state(served):
    _, health, base = served
    assert get(base + "/livez")[0] == 200
    assert get(base + "/readyz")[0] == 503
    health.set(model_loaded=True)
    assert get(base + "/readyz")[0] == 503
    health.set(partitions_assigned=True)
    assert get(base + "/readyz")[0] == 200
    assert get(base + "/nope")[0] == 404


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_health_is_live_while_the_loop_beats_and_not_after_the_timeout():
    clock = FakeClock()
    health = Health(liveness_timeout_seconds=30.0, clock=clock)
    assert health.live  # the clock starts when the daemon does
    clock.now += 29.0
    assert health.live and health.seconds_since_beat() == 29.0
    clock.now += 2.0  # start-up that never reached the loop: stuck too
    assert not health.live
    health.beat()
    assert health.live and health.seconds_since_beat() == 0.0
    for _ in range(10):  # a loop going round, however long it runs
        clock.now += 20.0
        health.beat()
        assert health.live
    clock.now += 30.0
    assert health.live  # at the limit
    clock.now += 0.5
    assert not health.live
    health.set(model_loaded=True, partitions_assigned=True)
    assert health.ready and not health.live  # readiness is another question


def test_health_without_a_timeout_is_always_live():
    clock = FakeClock()
    health = Health(clock=clock)
    clock.now += 1e9
    assert health.live
    with pytest.raises(ValueError, match="liveness_timeout_seconds"):
        Health(liveness_timeout_seconds=0.0)


def test_livez_turns_503_when_the_beats_stop_and_200_when_they_resume():
    registry = CollectorRegistry()
    health = Health(liveness_timeout_seconds=0.5)
    server = MetricsServer(registry, health, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.port}"
    beating = threading.Event()
    done = threading.Event()

    def loop() -> None:  # the daemon's loop: a beat at the top of each iteration
        while not done.is_set():
            if beating.is_set():
                health.beat()
            time.sleep(0.02)

    thread = threading.Thread(target=loop, daemon=True)
    beating.set()
    thread.start()
    try:
        deadline = time.monotonic() + 1.5  # three timeouts' worth of scrapes, all green
        while time.monotonic() < deadline:
            assert get(base + "/livez") == (200, "ok\n")
            time.sleep(0.05)
        beating.clear()  # the loop is stuck (the thread lives on, but never goes round)
        time.sleep(0.8)
        status, body = get(base + "/livez")
        assert status == 503
        assert body.startswith("not live: the loop has not gone round for ")
        assert "(metrics.liveness_timeout_seconds=0.5)" in body
        assert get(base + "/metrics")[0] == 200  # the server itself still answers
        beating.set()
        time.sleep(0.1)
        assert get(base + "/livez")[0] == 200
    finally:
        done.set()
        thread.join(timeout=5)
        server.stop()


def test_livez_follows_the_online_loop_itself(tmp_path):
    """The loop beats on every iteration, idle ones included; once it stops, /livez turns 503."""
    from streamvi.config import load_settings
    from streamvi.io.codecs import RecordDecoder
    from streamvi.io.memory import MemorySink, MemorySource
    from streamvi.runtime import build_trainer
    from streamvi.snapshots import SnapshotStore
    from streamvi.stream import CheckpointPolicy, OnlineLoop, OutputTopics
    from tests.unit.test_loop import records

    settings = load_settings(
        overrides=["input.dim=6", "model.latent_dim=2", "model.encoder_hidden=[8]", "training.batch_size=4"],
        environ={},
    )
    registry, health = CollectorRegistry(), Health(liveness_timeout_seconds=1.5)
    sink = MemorySink()
    loop = OnlineLoop(
        source=MemorySource(records(8)),
        sink=sink,
        decoder=RecordDecoder("json", 6, 4096),
        trainer=build_trainer(settings),
        store=SnapshotStore(tmp_path),
        topics=OutputTopics("lat", "met", "dlq"),
        policy=CheckpointPolicy(every_steps=1000, every_seconds=3600),
        max_batch_latency_seconds=0.1,
        metrics=Metrics(registry),
        health=health,
    )
    loop.restore()
    server = MetricsServer(registry, health, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.port}"
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    try:
        thread.start()

        def latents() -> int:  # sent, flushed or not (they are flushed at checkpoints)
            return sum(m.topic == "lat" for m in [*sink.pending, *sink.delivered])

        deadline = time.monotonic() + 120  # the first step waits for its XLA compile
        while latents() < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert latents() == 8
        for _ in range(8):  # idle now: the loop still goes round, polling for input
            assert get(base + "/livez")[0] == 200
            time.sleep(0.25)
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive()
        time.sleep(1.7)
        assert get(base + "/livez")[0] == 503
    finally:
        server.stop()
