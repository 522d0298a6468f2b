from __future__ import annotations

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
