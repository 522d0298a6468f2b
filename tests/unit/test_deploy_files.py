"""The deployment files: Dockerfile, compose stack, Prometheus rules (promtool), Grafana, Kubernetes.

None of this needs Docker or a cluster: the files are parsed and checked against what the product
actually reads (config keys, environment variables, ports, paths, metric names). promtool comes
from Debian's ``prometheus`` package, installed by ``make test``; its absence fails these tests.
The kustomizations are also rendered with ``kubectl kustomize`` where kubectl is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from streamvi.config import load_settings
from streamvi.metrics import EncoderMetrics, Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamvi.json"
K8S = DEPLOY / "k8s"
TRAINER_JOB = "streamvi"  # the Prometheus job names the rules and the dashboard expect
ENCODER_JOB = "streamvi-encoder"
SNAPSHOTS = "/var/lib/streamvi/snapshots"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make test` installs it (apt-get install prometheus)"
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


# -- Dockerfile ----------------------------------------------------------------------------------
def test_dockerfile_is_multi_stage_non_root_with_exec_entrypoint_and_healthcheck():
    instructions = dockerfile_instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 3, "builder and runtime stages expected"
    assert any(rest.startswith("base-${VARIANT} AS builder") for rest in froms)
    assert froms[-1] == "base-${VARIANT} AS runtime"
    final = next(i for i, (k, r) in enumerate(instructions) if k == "FROM" and r == froms[-1])
    runtime = instructions[final:]
    assert any(k == "COPY" and r.startswith("--from=builder") for k, r in runtime)
    users = [r for k, r in runtime if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entrypoint = [r for k, r in runtime if k == "ENTRYPOINT"]
    assert entrypoint, "ENTRYPOINT missing"
    assert json.loads(entrypoint[-1]) == ["streamvi"], "exec form, so SIGTERM reaches the daemon"
    assert json.loads([r for k, r in runtime if k == "CMD"][-1]) == ["run"]
    healthcheck = [r for k, r in runtime if k == "HEALTHCHECK"]
    assert healthcheck and "/livez" in healthcheck[-1]
    assert "9108" in " ".join(r for k, r in runtime if k == "EXPOSE")


def test_dockerfile_cpu_default_and_gpu_variant_pin_the_tensorflow_version():
    args = dict(
        rest.split("=", 1) for keyword, rest in dockerfile_instructions() if keyword == "ARG" and "=" in rest
    )
    assert args["VARIANT"] == "cpu"
    import tensorflow as tf

    assert args["TF_VERSION"] == tf.__version__, "image and test environment run the same TensorFlow"
    froms = [rest for keyword, rest in dockerfile_instructions() if keyword == "FROM"]
    assert "tensorflow/tensorflow:${TF_VERSION}-gpu AS base-gpu" in froms
    assert "${PYTHON_IMAGE} AS base-cpu" in froms
    assert re.fullmatch(r"python:3\.1[0-9]-slim-\w+", args["PYTHON_IMAGE"])


def test_container_environment_is_a_valid_configuration():
    env = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    settings = load_settings(environ={k: v for k, v in env.items() if k.startswith("STREAMVI_")})
    assert settings.metrics.host == "0.0.0.0"  # the default stays 127.0.0.1 outside containers
    assert load_settings(environ={}).metrics.host == "127.0.0.1"
    assert str(settings.snapshots.dir) == "/var/lib/streamvi/snapshots"
    volumes = [rest for keyword, rest in dockerfile_instructions() if keyword == "VOLUME"]
    assert json.loads(volumes[-1]) == [str(settings.snapshots.dir)]


def test_dockerignore_keeps_the_build_context_small():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**", "ignore everything, then allow what the image needs"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "streamvi", "configs"}
    copied = {
        rest.split()[0].rstrip("/")
        for keyword, rest in dockerfile_instructions()
        if keyword == "COPY" and not rest.startswith("--from")
    }
    assert copied <= allowed


# -- compose -------------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def encoder_services(stack: dict) -> dict[str, dict]:
    return {name: s for name, s in stack["services"].items() if s.get("command", [None])[0] == "serve"}


def compose_settings(stack: dict, name: str):
    env = {k: str(v) for k, v in stack["services"][name]["environment"].items() if k != "STREAMVI_CONFIG"}
    return load_settings(DEPLOY / "streamvi.yaml", environ=env)


def scrape_targets(job_name: str) -> list[str]:
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    return [
        t
        for job in scrape["scrape_configs"]
        if job["job_name"] == job_name
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]


def test_compose_services_images_and_wiring():
    stack = compose()
    services = stack["services"]
    assert set(services) == {
        "kafka",
        "streamvi",
        "encoder-1",
        "encoder-2",
        "producer",
        "prometheus",
        "grafana",
    }
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image version"
    assert services["kafka"]["image"].startswith("apache/kafka:")
    kafka_env = services["kafka"]["environment"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft, no ZooKeeper"
    assert "zookeeper" not in json.dumps(stack).lower()
    daemon = services["streamvi"]
    assert daemon["build"]["context"] == ".." and daemon["build"]["dockerfile"] == "Dockerfile"
    assert daemon["command"] == ["run"]
    assert daemon["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert any(
        v.endswith(":/var/lib/streamvi/snapshots") and v.startswith("snapshots") for v in daemon["volumes"]
    )
    assert "snapshots" in stack["volumes"]
    grace = int(daemon["stop_grace_period"].rstrip("s"))
    assert grace >= 30, "SIGTERM ends with a snapshot: give it time"
    producer = services["producer"]
    assert producer["image"] == daemon["image"] and producer["restart"] == "no"
    assert producer["command"][0] == "produce"


def test_compose_config_files_exist_and_are_valid_streamvi_configuration():
    stack = compose()
    for name, service in stack["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    for name in ("streamvi", "producer", *encoder_services(stack)):
        env = {k: str(v) for k, v in stack["services"][name]["environment"].items()}
        config = DEPLOY / "streamvi.yaml"
        mounted = {v.split(":")[1]: v.split(":")[0] for v in stack["services"][name]["volumes"] if ":" in v}
        assert mounted[env.pop("STREAMVI_CONFIG")] == "./streamvi.yaml"
        settings = load_settings(config, environ=env)
        assert settings.kafka.bootstrap_servers == ["kafka:9092"]
        kafka_listeners = stack["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        assert "PLAINTEXT://kafka:9092" in kafka_listeners
    daemon_settings = load_settings(
        DEPLOY / "streamvi.yaml",
        environ={
            k: str(v)
            for k, v in stack["services"]["streamvi"]["environment"].items()
            if k != "STREAMVI_CONFIG"
        },
    )
    assert daemon_settings.metrics.host == "0.0.0.0"
    port = daemon_settings.metrics.port
    assert f"127.0.0.1:{port}:{port}" in stack["services"]["streamvi"]["ports"]
    assert scrape_targets(TRAINER_JOB) == [f"streamvi:{port}"]


def test_compose_runs_one_trainer_and_two_encoder_replicas_sharing_the_snapshots():
    stack = compose()
    services = stack["services"]
    trainers = [name for name, s in services.items() if s.get("command", [None])[0] == "run"]
    assert trainers == ["streamvi"]
    trainer = services["streamvi"]
    trainer_settings = compose_settings(stack, "streamvi")
    assert trainer_settings.training.publish_latents is False, "the replicas publish the latents"
    encoders = encoder_services(stack)
    assert len(encoders) == 2 and all(s["command"] == ["serve"] for s in encoders.values())

    snapshots = str(trainer_settings.snapshots.dir)
    assert snapshots == SNAPSHOTS
    trainer_mount = [v for v in trainer["volumes"] if v.split(":")[1] == snapshots]
    assert trainer_mount == [f"snapshots:{snapshots}"], "the trainer writes its snapshots"
    assert "snapshots" in stack["volumes"]
    hostnames, host_ports = set(), set()
    for name, encoder in encoders.items():
        assert encoder["image"] == trainer["image"]
        settings = compose_settings(stack, name)
        # the same configuration file: the replicas load the trainer's snapshots
        assert settings.model == trainer_settings.model and settings.input == trainer_settings.input
        assert settings.kafka == trainer_settings.kafka
        assert settings.serving.group_id != settings.kafka.group_id
        assert settings.metrics.host == "0.0.0.0"
        assert str(settings.snapshots.dir) == snapshots
        assert f"snapshots:{snapshots}:ro" in encoder["volumes"], f"{name}: the shared volume, read-only"
        assert encoder["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert encoder["restart"] == "unless-stopped"
        assert int(encoder["stop_grace_period"].rstrip("s")) > settings.processing.shutdown_grace_seconds
        # exactly_once: <serving.group_id>-<hostname>-1 must differ between replicas
        hostnames.add(encoder["hostname"])
        host_ports.update(p.rsplit(":", 1)[0] for p in encoder["ports"])
        assert all(p.endswith(f":{settings.metrics.port}") for p in encoder["ports"])
        assert all(p.startswith("127.0.0.1:") for p in encoder["ports"])
    assert len(hostnames) == len(encoders) and len(host_ports) == len(encoders)
    assert not host_ports & {p.rsplit(":", 1)[0] for p in trainer["ports"]}
    # one partition per replica at least, or a replica idles; created by whichever starts first
    assert trainer_settings.kafka.create_topics
    assert trainer_settings.kafka.topic_partitions >= len(encoders) >= 2
    # Prometheus scrapes all three, under the job names the rules and the dashboard use
    port = trainer_settings.metrics.port
    assert sorted(scrape_targets(ENCODER_JOB)) == sorted(f"{name}:{port}" for name in encoders)
    assert set(services["prometheus"]["depends_on"]) >= {"streamvi", *encoders}


# -- compose: two trainer workers ----------------------------------------------------------------
def compose_with_workers() -> tuple[dict, dict]:
    """The stack with compose.workers.yaml layered on it, as `docker compose -f compose.yaml -f
    compose.workers.yaml` merges them (a service's mappings merged key by key), and the override."""
    stack = compose()
    override = yaml.safe_load((DEPLOY / "compose.workers.yaml").read_text())
    for name, service in override["services"].items():
        if name not in stack["services"]:
            stack["services"][name] = service
            continue
        base = stack["services"][name]
        for key, value in service.items():
            assert isinstance(value, dict) and isinstance(base.get(key), dict), (
                f"{name}.{key}: only mappings are overridden here (lists would be appended by compose)"
            )
            base[key] = {**base[key], **value}
    return stack, override


def test_compose_workers_file_runs_two_trainer_workers_of_one_model():
    from streamvi.cluster import resolve_cluster

    stack, override = compose_with_workers()
    services = stack["services"]
    assert set(override["services"]) == {"streamvi", "streamvi-worker-1"}
    assert set(override["services"]["streamvi"]) == {"environment"}, "the chief changes only its settings"
    trainers = [name for name, s in services.items() if s.get("command", [None])[0] == "run"]
    assert trainers == ["streamvi", "streamvi-worker-1"]
    # without the file, the one trainer of today
    assert compose_settings(compose(), "streamvi").distribution.strategy == "none"

    settings = {name: compose_settings(stack, name) for name in trainers}
    clusters = {name: resolve_cluster(s.distribution, environ={}) for name, s in settings.items()}
    assert {name: c.index for name, c in clusters.items()} == {"streamvi": 0, "streamvi-worker-1": 1}
    assert clusters["streamvi"].is_chief and not clusters["streamvi-worker-1"].is_chief
    workers = {c.workers for c in clusters.values()}
    assert len(workers) == 1, "the same worker list on every worker"
    (addresses,) = workers
    # worker i's address is the service of index i, on the compose network
    assert [a.rsplit(":", 1)[0] for a in addresses] == trainers
    chief, worker = (settings[name] for name in trainers)
    for s in (chief, worker):
        assert s.distribution.strategy == "multi_worker"
        assert s.processing.guarantee == "at_least_once", "exactly_once is refused with several workers"
        assert s.training.publish_latents is False, "the encoder replicas publish the latents"
    # one model in one consumer group on one topic, from one configuration
    assert chief.kafka == worker.kafka and chief.kafka.group_id == "streamvi"
    assert chief.model == worker.model and chief.input == worker.input and chief.training == worker.training
    assert chief.kafka.topic_partitions >= len(trainers), "a partition for each worker at least"
    env = {name: dict(services[name]["environment"]) for name in trainers}
    for e in env.values():
        e.pop("STREAMVI_DISTRIBUTION__WORKER_INDEX")
    assert env["streamvi"] == env["streamvi-worker-1"], "only the worker index differs"
    # the one snapshot store, read-write in both (worker 1 reads the chief's snapshots back and
    # keeps its progress file there)
    assert chief.snapshots.dir == worker.snapshots.dir
    for name in trainers:
        mounts = [v for v in services[name]["volumes"] if v.split(":")[1] == str(chief.snapshots.dir)]
        assert mounts == [f"snapshots:{chief.snapshots.dir}"], name

    second = services["streamvi-worker-1"]
    assert second["image"] == services["streamvi"]["image"] and "build" not in second
    assert second["command"] == services["streamvi"]["command"]
    assert second["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert second["restart"] == services["streamvi"]["restart"] == "unless-stopped", (
        "a worker that failed with its lost peer comes back"
    )
    assert second["stop_grace_period"] == services["streamvi"]["stop_grace_period"]
    host_ports = [p.rsplit(":", 1)[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), "each published port once"
    assert all(p.endswith(f":{worker.metrics.port}") for p in second["ports"])


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    stack = compose()
    grafana = stack["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/streamvi.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == path
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {source["uid"]}


# -- Prometheus: promtool ------------------------------------------------------------------------
def test_promtool_accepts_the_scrape_config_and_the_rules():
    checked = run_promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    rules = run_promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_alert_rules_pass_their_unit_tests():
    result = run_promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_cover_the_failure_modes_and_each_is_unit_tested():
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    required = {
        "StreamVIElboDropping": "streamvi_elbo_nats",
        "StreamVINoTrainingProgress": "streamvi_train_steps_total",
        "StreamVIConsumerLagGrowing": "streamvi_consumer_lag_records",
        "StreamVIDeadLetterRate": "streamvi_dead_letters_total",
        "StreamVISnapshotStale": "streamvi_last_snapshot_timestamp_seconds",
        "StreamVINonFiniteUpdates": "streamvi_nonfinite_updates_total",
        "StreamVITrainingDiverged": "streamvi_training_diverged",
        "StreamVIEncoderModelStale": "streamvi_snapshot_age_seconds",
        "StreamVIEncoderNoModel": "streamvi_snapshot_age_seconds",
        "StreamVISnapshotReloadFailed": "streamvi_snapshot_reload_failures_total",
        "StreamVIDriftDetected": "increase(streamvi_drift_detected_total[15m]) > 0",
        "StreamVIAnomalyRateHigh": "streamvi_anomalies_flagged_total",
        "StreamVIAnomalyUncalibrated": "streamvi_anomaly_threshold_elbo_nats",
    }
    for name, metric in required.items():
        assert name in alerts and metric in alerts[name]["expr"], name
    # the flagged share against the share the percentile promises, process by process
    anomaly_rate = re.sub(r"\s+", " ", alerts["StreamVIAnomalyRateHigh"]["expr"])
    for needed in (
        "rate(streamvi_anomalies_flagged_total[10m])",
        "rate(streamvi_latents_published_total[10m])",
        "> on(job, instance) 5 * (1 - max by (job, instance) (streamvi_anomaly_threshold_percentile) / 100)",
    ):
        assert needed in anomaly_rate, needed
    uncalibrated = alerts["StreamVIAnomalyUncalibrated"]
    assert (
        "streamvi_anomaly_threshold_elbo_nats != streamvi_anomaly_threshold_elbo_nats" in uncalibrated["expr"]
    )
    assert "streamvi_latents_published_total" in uncalibrated["expr"] and uncalibrated["for"] == "30m"
    assert "pre-drift" in alerts["StreamVIDriftDetected"]["annotations"]["description"]
    for name in ("StreamVIDriftDetected", "StreamVIAnomalyRateHigh", "StreamVIAnomalyUncalibrated"):
        assert "README, Anomalies and drift" in alerts[name]["annotations"]["description"], name
    down = alerts["StreamVIDown"]["expr"]
    jobs = re.search(r'up\{job=~"([^"]+)"\}', down).group(1)  # Prometheus anchors the regex
    assert re.fullmatch(jobs, TRAINER_JOB) and re.fullmatch(jobs, ENCODER_JOB), "both roles are watched"
    assert "[15m]" in alerts["StreamVISnapshotReloadFailed"]["expr"]
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == set(alerts), "every alert has a test in which it fires"
    quiet = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert {
        "StreamVIEncoderModelStale",
        "StreamVIEncoderNoModel",
        "StreamVISnapshotReloadFailed",
        "StreamVIDriftDetected",
        "StreamVIAnomalyRateHigh",
        "StreamVIAnomalyUncalibrated",
    } <= quiet

    # a replica without a model (NaN age) and a reference not calibrated yet (NaN threshold) are
    # tested cases, not accidents of the input
    def nan_cases(metric: str) -> set[str]:
        return {
            case["alertname"]
            for test in tests["tests"]
            if any(metric in s["series"] and "NaN" in s["values"] for s in test["input_series"])
            for case in test.get("alert_rule_test", [])
        }

    assert {"StreamVIEncoderModelStale", "StreamVIEncoderNoModel"} <= nan_cases(
        "streamvi_snapshot_age_seconds"
    )
    assert "StreamVIAnomalyUncalibrated" in nan_cases("streamvi_anomaly_threshold_elbo_nats")


def exported_metric_names(metrics_class) -> set[str]:
    """The sample names a role's registry exports (labelled series included before their first use)."""
    registry = CollectorRegistry()
    metrics_class(registry)
    suffixes = {
        "counter": ["_total"],
        "gauge": [""],
        "histogram": ["_bucket", "_sum", "_count"],
        "info": ["_info"],
    }
    return {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}


def queried_metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bstreamvi_[a-z0-9_]+", text))


def test_rules_and_dashboard_query_only_metrics_a_trainer_or_a_replica_exports():
    trainer, encoder = exported_metric_names(Metrics), exported_metric_names(EncoderMetrics)
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert queried_metric_names(rule["expr"]) <= trainer | encoder, rule["alert"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            assert queried_metric_names(expr) <= trainer | encoder, panel["title"]
            if "$encoder_job" in expr:  # a replica panel asks the replicas for what they export
                assert queried_metric_names(expr) <= encoder, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert queried_metric_names(variable["query"]["query"]) <= trainer | encoder, variable["name"]
    # the metrics this deployment is about, on the role that exports them
    assert {
        "streamvi_model_step",
        "streamvi_snapshot_age_seconds",
        "streamvi_snapshot_reloads_total",
        "streamvi_snapshot_reload_failures_total",
        "streamvi_records_encoded_total",
        "streamvi_consumer_lag_records",
    } <= encoder
    assert "streamvi_records_encoded_total" not in trainer and "streamvi_train_steps_total" not in encoder
    # anomalies are flagged by both roles (the anomaly alerts watch each process); drift is the trainer's
    anomalies = {
        "streamvi_anomalies_flagged_total",
        "streamvi_anomaly_threshold_percentile",
        "streamvi_anomaly_threshold_elbo_nats",
        "streamvi_latents_published_total",
    }
    assert anomalies <= trainer & encoder
    assert {"streamvi_drift_detected_total", "streamvi_seconds_since_drift", "streamvi_drift_adapting"} <= (
        trainer - encoder
    )


def test_promtool_catches_a_broken_rule(tmp_path):
    """The checks above can fail: a rule with a PromQL syntax error is rejected."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "rate(streamvi_x_total[5m]"}]}]}
        )
    )
    result = subprocess.run([promtool(), "check", "rules", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0


# -- Grafana dashboard ---------------------------------------------------------------------------
def test_dashboard_shows_what_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "streamvi"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    everything = " ".join(exprs.values())
    for needed in (
        "streamvi_elbo_nats",
        "streamvi_kl_nats",
        "streamvi_reconstruction_nats",
        "streamvi_heldout_elbo_nats",
        "rate(streamvi_records_consumed_total",
        "histogram_quantile(0.99, sum by (le, instance) (rate(streamvi_step_duration_seconds_bucket",
        "streamvi_consumer_lag_records",
        "sum by (reason) (rate(streamvi_dead_letters_total",
        "time() - streamvi_last_snapshot_timestamp_seconds",
        "rate(streamvi_anomalies_flagged_total",
        "rate(streamvi_latents_published_total",
        "streamvi_anomaly_threshold_percentile",
        "streamvi_anomaly_threshold_elbo_nats",
        "increase(streamvi_drift_detected_total",
        "streamvi_seconds_since_drift",
        "streamvi_drift_adapting",
    ):
        assert needed in everything, needed
    lag = next(p for p in panels if "streamvi_consumer_lag_records" in exprs[p["title"]])
    assert "{{partition}}" in lag["targets"][0]["legendFormat"]
    for panel in panels:
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), panel["title"]
        box = panel["gridPos"]
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24


def test_dashboard_shows_the_encoder_replicas():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"job", "instance", "encoder_job"} <= set(variables)
    encoder_job = variables["encoder_job"]
    assert "streamvi_records_encoded_total" in encoder_job["query"]["query"]
    assert encoder_job["current"]["value"] == ENCODER_JOB
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert any("encoder" in title.lower() for title in rows)

    def panel_with(*needles: str) -> dict:
        found = [p for p in panels if all(n in " ".join(t["expr"] for t in p["targets"]) for n in needles)]
        assert found, needles
        return found[0]

    replica = 'job="$encoder_job"'
    step = panel_with(f"streamvi_model_step{{{replica}}}", 'streamvi_model_step{job="$job"')
    legends = [t["legendFormat"] for t in step["targets"]]
    assert "{{instance}}" in legends and "trainer" in legends, "each replica's step against the trainer's"
    age = panel_with(f"streamvi_snapshot_age_seconds{{{replica}}}")
    assert (
        age["fieldConfig"]["defaults"]["unit"] == "s" and age["targets"][0]["legendFormat"] == "{{instance}}"
    )
    reloads = panel_with(
        "rate(streamvi_snapshot_reloads_total", "rate(streamvi_snapshot_reload_failures_total"
    )
    assert any(
        "sum by (reason)" in t["expr"] and "{{reason}}" in t["legendFormat"] for t in reloads["targets"]
    )
    encoded = panel_with(f"sum by (instance) (rate(streamvi_records_encoded_total{{{replica}}}")
    lag = panel_with(f"sum by (instance) (streamvi_consumer_lag_records{{{replica}}})")
    for panel in (encoded, lag):
        assert panel["targets"][0]["legendFormat"] == "{{instance}}"
        assert panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal", (
            "the top is the group"
        )
    # the trainer's panels still show the trainer
    assert any('streamvi_consumer_lag_records{job="$job"' in t["expr"] for p in panels for t in p["targets"])


def test_dashboard_shows_anomalies_and_drift_in_the_bottom_row():
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    row = next(p for p in rows if p["title"] == "Anomalies and drift")
    top = row["gridPos"]["y"]
    assert all(p["gridPos"]["y"] < top for p in rows if p is not row), "the row is the last one"
    below = [p for p in dashboard["panels"] if p["type"] != "row" and p["gridPos"]["y"] > top]

    def panel_with(*needles: str) -> dict:
        found = [p for p in below if all(n in " ".join(t["expr"] for t in p["targets"]) for n in needles)]
        assert found, needles
        return found[0]

    flagged = panel_with("rate(streamvi_anomalies_flagged_total")
    assert flagged["title"] == "Anomalies flagged per second"
    assert any('job="$encoder_job"' in t["expr"] for t in flagged["targets"]), "the replicas flag too"
    fraction = panel_with(
        "rate(streamvi_anomalies_flagged_total", "rate(streamvi_latents_published_total", "1 - max("
    )
    assert fraction["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert {"expected", "alert"} <= {t["legendFormat"] for t in fraction["targets"]}
    threshold = panel_with("streamvi_anomaly_threshold_elbo_nats")
    assert threshold["title"] == "Anomaly threshold (ELBO, nats)"
    drifts = panel_with("increase(streamvi_drift_detected_total")
    assert drifts["title"] == "Drifts detected"
    since = panel_with("streamvi_seconds_since_drift")
    assert since["title"] == "Time since last drift" and since["type"] == "stat"
    assert since["fieldConfig"]["defaults"]["unit"] == "s"
    # NaN: no drift since the model was created, shown as such rather than as NaN
    assert any(
        m["type"] == "special" and m["options"]["match"] == "nan"
        for m in since["fieldConfig"]["defaults"]["mappings"]
    )
    assert panel_with("streamvi_drift_adapting")["title"] == "Adapting after a drift"


def test_dashboard_panels_do_not_overlap():
    dashboard = json.loads(DASHBOARD.read_text())
    cells = set()
    for panel in dashboard["panels"]:
        box = panel["gridPos"]
        mine = {
            (x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])
        }
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine


# -- Kubernetes ----------------------------------------------------------------------------------
def k8s_documents(directory: Path = K8S) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    documents = []
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((directory / resource).read_text()):
            assert document["apiVersion"] and document["metadata"]["name"], resource
            documents.append(document)
    return documents


def k8s_objects(directory: Path = K8S) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents(directory)}


def only(objects: dict[tuple[str, str], dict], kind: str, name: str | None = None) -> dict:
    found = [o for (k, n), o in objects.items() if k == kind and name in (None, n)]
    assert len(found) == 1, f"one {kind} {name or ''} expected, found {len(found)}"
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def container_settings(objects, pod: dict, container: dict):
    """The ConfigMap's config plus the container's environment (Secret values filled in)."""
    config = only(objects, "ConfigMap")["data"]["streamvi.yaml"]
    secret = only(objects, "Secret")
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            env[item["name"]] = secret["stringData"][ref["key"]]
    config_path = env.pop("STREAMVI_CONFIG")
    config_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == config_path)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == config_mount["name"])
    assert volume["configMap"]["name"] == only(objects, "ConfigMap")["metadata"]["name"]
    assert "sasl_password" not in config, "secrets come from the Secret, not the ConfigMap"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        handle.write(config)
        handle.flush()
        return load_settings(handle.name, environ=env)


def snapshot_claim(objects, pod: dict, container: dict, settings) -> tuple[dict, dict]:
    """The PersistentVolumeClaim mounted at snapshots.dir, and that mount."""
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(settings.snapshots.dir))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    return only(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]), mount


def test_k8s_manifests_are_complete_and_consistent():
    objects = k8s_objects()
    kinds = {kind for kind, _ in objects}
    assert kinds >= {"StatefulSet", "Deployment", "ConfigMap", "Secret", "Service", "ServiceMonitor"}
    assert kinds >= {"PersistentVolumeClaim"}
    statefulset = only(objects, "StatefulSet")
    service = only(objects, "Service", statefulset["spec"]["serviceName"])
    monitor = only(objects, "ServiceMonitor", TRAINER_JOB)
    pod = statefulset["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["metadata"]["name"] == TRAINER_JOB, "the ServiceMonitor's job is the Service's name"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert container["args"] == ["run"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # grace period: a step (seconds) plus a snapshot (seconds, more on slow volumes), with margin
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 60

    settings = container_settings(objects, pod, container)
    secret = only(objects, "Secret")["stringData"]
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.kafka.sasl_mechanism.startswith("SCRAM")
    assert settings.kafka.sasl_password.get_secret_value() == secret["sasl-password"]
    assert settings.training.publish_latents is False, "the encoder replicas publish the latents"
    assert port_names["metrics"] == settings.metrics.port and settings.metrics.host == "0.0.0.0"
    # the snapshots: the shared ReadWriteMany claim, read-write, not a per-pod volumeClaimTemplate
    assert "volumeClaimTemplates" not in statefulset["spec"]
    claim, mount = snapshot_claim(objects, pod, container, settings)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not mount.get("readOnly"), "the trainer writes the snapshots"
    ca_dir = str(settings.kafka.ssl_cafile.parent)
    tls_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == ca_dir)
    tls_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == tls_mount["name"])
    assert settings.kafka.ssl_cafile.name in {i["path"] for i in tls_volume["secret"]["items"]}
    assert tls_volume["secret"]["secretName"] == only(objects, "Secret")["metadata"]["name"]


def test_k8s_encoder_deployment_serves_from_the_shared_claim_read_only():
    objects = k8s_objects()
    trainer = only(objects, "StatefulSet")
    deployment = only(objects, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    assert "replicas" not in deployment["spec"], "the autoscaler (or kubectl scale) owns the count"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, (
        "a surplus replica never turns ready"
    )
    container = pod["spec"]["containers"][0]
    trainer_container = trainer["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["serve"]
    assert container["image"] == trainer_container["image"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 30

    settings = container_settings(objects, pod, container)
    trainer_settings = container_settings(objects, trainer["spec"]["template"], trainer_container)
    assert settings.model == trainer_settings.model and settings.input == trainer_settings.input
    assert settings.serving.group_id != settings.kafka.group_id == trainer_settings.kafka.group_id
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == settings.metrics.port and settings.metrics.host == "0.0.0.0"
    assert settings.snapshots.dir == trainer_settings.snapshots.dir
    claim, mount = snapshot_claim(objects, pod, container, settings)
    trainer_claim, _ = snapshot_claim(
        objects, trainer["spec"]["template"], trainer_container, trainer_settings
    )
    assert claim is trainer_claim and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert mount["readOnly"] is True, "a replica never writes into snapshots.dir"
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["readOnly"] is True

    # metrics: a Service and a ServiceMonitor of their own, the job name the rules expect
    service = only(objects, "Service", ENCODER_JOB)
    assert selects(service["spec"]["selector"], labels)
    assert not selects(service["spec"]["selector"], trainer["spec"]["template"]["metadata"]["labels"])
    trainer_service = only(objects, "Service", TRAINER_JOB)
    assert not selects(trainer_service["spec"]["selector"], labels), "the trainer's job stays the trainer"
    assert service["spec"]["publishNotReadyAddresses"] is True, "a replica waiting for a model is scraped"
    monitor = only(objects, "ServiceMonitor", ENCODER_JOB)
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert not selects(monitor["spec"]["selector"]["matchLabels"], trainer_service["metadata"]["labels"])
    endpoint = monitor["spec"]["endpoints"][0]
    assert (
        endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    )
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "instance"} in endpoint[
        "relabelings"
    ]


def test_k8s_keda_scaled_object_scales_the_encoders_on_the_serving_groups_lag():
    base = k8s_documents()
    assert not [d for d in base if d["apiVersion"].startswith("keda.sh/")], "the default needs no KEDA CRD"
    assert {d["apiVersion"] for d in base} <= {"v1", "apps/v1", "monitoring.coreos.com/v1"}
    kustomization = yaml.safe_load((K8S / "keda" / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == only(k8s_objects(), "Namespace")["metadata"]["name"]
    keda = {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents(K8S / "keda")}
    scaled = only(keda, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    objects = k8s_objects()
    deployment = only(objects, "Deployment")
    target = scaled["spec"]["scaleTargetRef"]
    assert (
        target["name"] == deployment["metadata"]["name"] and target.get("kind", "Deployment") == "Deployment"
    )
    pod = deployment["spec"]["template"]
    settings = container_settings(objects, pod, pod["spec"]["containers"][0])
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert meta["consumerGroup"] == settings.serving.group_id != settings.kafka.group_id
    assert meta["topic"] == settings.kafka.input_topic
    assert meta["bootstrapServers"].split(",") == settings.kafka.bootstrap_servers
    assert int(meta["lagThreshold"]) > 0
    assert meta["offsetResetPolicy"] == "earliest", "as the replicas' consumer"
    assert meta.get("allowIdleConsumers", "false") == "false", "no more replicas than partitions"
    keda_sasl = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
    assert meta["sasl"] == keda_sasl[settings.kafka.sasl_mechanism]
    assert meta["tls"] == ("enable" if settings.kafka.security_protocol.endswith("SSL") else "disable")
    spec = scaled["spec"]
    # two at least, so one lost replica is a rebalance, not a stop of the latents; room to scale;
    # and when KEDA cannot read the lag it holds the minimum rather than guessing
    assert spec["minReplicaCount"] >= 2
    assert spec["maxReplicaCount"] > spec["minReplicaCount"]
    assert spec["fallback"]["replicas"] == spec["minReplicaCount"]
    auth = only(keda, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    secret = only(objects, "Secret")
    refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"username", "password", "ca"}
    for ref in refs.values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


@pytest.mark.parametrize("overlay", ["", "keda"])
def test_k8s_kustomizations_render(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert rendered
    for document in rendered:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "streamvi", document["metadata"]["name"]


def test_k8s_gpu_overlay_requests_a_gpu_and_the_gpu_image():
    kustomization = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [".."]
    patch = yaml.safe_load((K8S / "gpu" / kustomization["patches"][0]["path"]).read_text())
    assert (
        patch["kind"] == "StatefulSet"
        and patch["metadata"]["name"] == only(k8s_objects(), "StatefulSet")["metadata"]["name"]
    )
    container = patch["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith("-gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {item["name"]: item["value"] for item in container["env"]}
    assert load_settings(environ=env).training.device == "/GPU:0"


# -- Kubernetes: the trainer as several workers (deploy/k8s-workers) ------------------------------
K8S_WORKERS = DEPLOY / "k8s-workers"


def strategic_merge(base, patch):
    """``patch`` over ``base`` as kustomize merges these patches: mappings key by key, lists of
    named items (containers, env, ports, volumes) item by item, the patch's items first."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: strategic_merge(base[k], v) if k in base else v for k, v in patch.items()}}
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(item, dict) and "name" in item for item in [*base, *patch]):
        old = {item["name"]: item for item in base}
        new = [strategic_merge(old[item["name"]], item) if item["name"] in old else item for item in patch]
        return new + [item for item in base if item["name"] not in {i["name"] for i in patch}]
    return patch


def workers_kustomization() -> dict:
    return yaml.safe_load((K8S_WORKERS / "kustomization.yaml").read_text())


def workers_objects() -> dict[tuple[str, str], dict]:
    kustomization = workers_kustomization()
    objects: dict[tuple[str, str], dict] = {}
    for resource in kustomization["resources"]:
        path = (K8S_WORKERS / resource).resolve()
        documents = k8s_documents(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
        for document in documents:
            key = (document["kind"], document["metadata"]["name"])
            assert key not in objects, key
            objects[key] = document
    for patch in kustomization["patches"]:
        document = yaml.safe_load((K8S_WORKERS / patch["path"]).read_text())
        key = (document["kind"], document["metadata"]["name"])
        assert key in objects, f"{patch['path']} patches nothing"
        objects[key] = strategic_merge(objects[key], document)
    return objects


def worker_env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"] if "value" in item}


def worker_settings(objects, pod: dict, container: dict):
    """The settings a worker loads: as container_settings, the downward-API variables left out."""
    env = [item for item in container["env"] if "fieldRef" not in item.get("valueFrom", {})]
    return container_settings(objects, pod, {**container, "env": env})


def test_k8s_workers_overlay_is_the_base_with_the_trainer_as_parallel_workers():
    kustomization = workers_kustomization()
    bases = [(K8S_WORKERS / r).resolve() for r in kustomization["resources"] if (K8S_WORKERS / r).is_dir()]
    assert bases == [K8S.resolve()]
    # kustomize refuses ("cycle detected") an overlay loading a directory that contains it
    assert not K8S_WORKERS.resolve().is_relative_to(K8S.resolve())
    assert kustomization["namespace"] == only(k8s_objects(), "Namespace")["metadata"]["name"]
    objects = workers_objects()
    assert set(objects) - set(k8s_objects()) == {("Service", "streamvi-workers")}
    statefulset = only(objects, "StatefulSet")
    spec = statefulset["spec"]
    pod = spec["template"]
    container = pod["spec"]["containers"][0]
    env = worker_env(container)
    assert spec["replicas"] == int(env["WORKER_COUNT"]) == 2
    assert spec["podManagementPolicy"] == "Parallel", "a worker waits for all the others to start"
    assert pod["spec"].get("restartPolicy", "Always") == "Always"
    assert container["args"] == ["run"] and container["command"][:2] == ["python3", "-c"]

    settings = worker_settings(objects, pod, container)
    assert settings.distribution.strategy == "multi_worker"
    assert settings.distribution.workers == [], "the cluster comes from TF_CONFIG"
    assert settings.processing.guarantee == "at_least_once"
    assert settings.training.publish_latents is False
    # one snapshot store for all workers: the RWX claim, read-write, never a per-pod volume
    assert "volumeClaimTemplates" not in spec
    claim, mount = snapshot_claim(objects, pod, container, settings)
    assert claim["metadata"]["name"] == "streamvi-snapshots"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and not mount.get("readOnly")
    encoders = only(objects, "Deployment")
    encoder_pod = encoders["spec"]["template"]
    encoder = encoder_pod["spec"]["containers"][0]
    encoder_claim, _ = snapshot_claim(
        objects, encoder_pod, encoder, worker_settings(objects, encoder_pod, encoder)
    )
    assert encoder_claim is claim

    # the headless governing Service: stable pod DNS names and the collective port, not-ready pods
    # included (a worker is not ready before all have met)
    service = only(objects, "Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
    assert not selects(service["spec"]["selector"], encoder_pod["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port["name"] == port["targetPort"] == "collective"
    assert port["port"] == container_ports["collective"] == int(env["WORKER_PORT"])
    assert env["WORKER_SERVICE"] == service["metadata"]["name"]
    assert container_ports["metrics"] == settings.metrics.port
    # metrics stay with the trainer's Service and ServiceMonitor (job streamvi)
    assert selects(only(objects, "Service", TRAINER_JOB)["spec"]["selector"], pod["metadata"]["labels"])
    monitor = only(objects, "ServiceMonitor", TRAINER_JOB)
    assert not selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])


def run_worker_entrypoint(ordinal: int, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    """The worker container's command and args, as the pod of ``ordinal`` runs them, with a
    ``streamvi`` on PATH that prints the TF_CONFIG and the arguments it was started with."""
    objects = workers_objects()
    statefulset = only(objects, "StatefulSet")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "streamvi"
    stub.write_text('#!/bin/sh\nprintf \'%s\\n\' "$TF_CONFIG" "$*"\n')
    stub.chmod(0o755)
    (bin_dir / "python3").unlink(missing_ok=True)
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {
        **worker_env(container),
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "POD_NAME": f"{statefulset['metadata']['name']}-{ordinal}",
        "POD_NAMESPACE": workers_kustomization()["namespace"],
    }
    downward = {i["name"] for i in container["env"] if "fieldRef" in i.get("valueFrom", {})}
    assert downward == {"POD_NAME", "POD_NAMESPACE"}
    result = subprocess.run(
        [*container["command"], *container["args"]], env=env, capture_output=True, text=True, timeout=60
    )
    return result, objects


@pytest.mark.parametrize("ordinal", [0, 1])
def test_k8s_worker_entrypoint_builds_tf_config_from_the_pod_ordinal(ordinal, tmp_path):
    from streamvi.cluster import resolve_cluster
    from streamvi.config import DistributionSettings

    result, objects = run_worker_entrypoint(ordinal, tmp_path)
    assert result.returncode == 0, result.stderr
    tf_config, args = result.stdout.splitlines()
    assert args == "run", "the daemon is exec'd with the container's args"
    statefulset = only(objects, "StatefulSet")
    spec = statefulset["spec"]
    (port,) = only(objects, "Service", spec["serviceName"])["spec"]["ports"]
    namespace = workers_kustomization()["namespace"]
    expected = tuple(
        f"{statefulset['metadata']['name']}-{i}.{spec['serviceName']}.{namespace}.svc:{port['port']}"
        for i in range(spec["replicas"])
    )
    assert json.loads(tf_config) == {
        "cluster": {"worker": list(expected)},
        "task": {"type": "worker", "index": ordinal},
    }
    cluster = resolve_cluster(DistributionSettings(strategy="multi_worker"), {"TF_CONFIG": tf_config})
    assert cluster.source == "TF_CONFIG" and cluster.workers == expected
    assert cluster.index == ordinal and cluster.is_chief is (ordinal == 0)


def test_k8s_worker_entrypoint_refuses_an_ordinal_beyond_the_worker_count(tmp_path):
    replicas = only(workers_objects(), "StatefulSet")["spec"]["replicas"]
    result, _ = run_worker_entrypoint(replicas, tmp_path)
    assert result.returncode != 0 and result.stdout == "", "the daemon must not start"
    assert "WORKER_COUNT" in result.stderr


def test_k8s_workers_overlay_renders_as_merged_here():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_WORKERS)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}
    objects = workers_objects()
    assert set(rendered) == set(objects)
    for key, document in rendered.items():
        if key[0] != "Namespace":
            assert document["metadata"]["namespace"] == "streamvi", key
    for key in (("StatefulSet", "streamvi"), ("Service", "streamvi-workers")):
        assert rendered[key]["spec"] == objects[key]["spec"], key


@pytest.mark.parametrize("path", sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.y*ml")))
def test_every_yaml_file_parses(path):
    documents = list(yaml.safe_load_all((DEPLOY / path).read_text()))
    assert documents and all(isinstance(d, dict) for d in documents)
