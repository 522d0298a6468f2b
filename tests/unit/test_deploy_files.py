"""The deployment files: Dockerfile, compose stack, Prometheus rules (promtool), Grafana, Kubernetes.

None of this needs Docker or a cluster: the files are parsed and checked against what the product
actually reads (config keys, environment variables, ports, paths, metric names). promtool comes
from Debian's ``prometheus`` package, installed by ``make test``; its absence fails these tests.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from streamvi.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamvi.json"
K8S = DEPLOY / "k8s"


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


def test_compose_services_images_and_wiring():
    stack = compose()
    services = stack["services"]
    assert set(services) == {"kafka", "streamvi", "producer", "prometheus", "grafana"}
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
    for name in ("streamvi", "producer"):
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
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = [
        t
        for job in scrape["scrape_configs"]
        if job["job_name"] == "streamvi"
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    assert targets == [f"streamvi:{port}"]


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
    }
    for name, metric in required.items():
        assert name in alerts and metric in alerts[name]["expr"], name
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
    ):
        assert needed in everything, needed
    lag = next(p for p in panels if "streamvi_consumer_lag_records" in exprs[p["title"]])
    assert "{{partition}}" in lag["targets"][0]["legendFormat"]
    for panel in panels:
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), panel["title"]
        box = panel["gridPos"]
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24


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
def k8s_objects(directory: Path = K8S) -> dict[str, dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects = {}
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((directory / resource).read_text()):
            assert document["apiVersion"] and document["metadata"]["name"], resource
            objects[document["kind"]] = document
    return objects


def test_k8s_manifests_are_complete_and_consistent():
    objects = k8s_objects()
    assert set(objects) >= {"StatefulSet", "ConfigMap", "Secret", "Service", "ServiceMonitor"}
    statefulset, service, monitor = objects["StatefulSet"], objects["Service"], objects["ServiceMonitor"]
    pod = statefulset["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # grace period: a step (seconds) plus a snapshot (seconds, more on slow volumes), with margin
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 60
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert claim["metadata"]["name"] in mounts

    # the ConfigMap's config plus the container's environment (Secret values filled in) is valid
    config = objects["ConfigMap"]["data"]["streamvi.yaml"]
    secret = objects["Secret"]["stringData"]
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == objects["Secret"]["metadata"]["name"]
            env[item["name"]] = secret[ref["key"]]
    config_path = env.pop("STREAMVI_CONFIG")
    config_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == config_path)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == config_mount["name"])
    assert volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert "sasl_password" not in config, "secrets come from the Secret, not the ConfigMap"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        handle.write(config)
        handle.flush()
        settings = load_settings(handle.name, environ=env)
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.kafka.sasl_mechanism.startswith("SCRAM")
    assert settings.kafka.sasl_password.get_secret_value() == secret["sasl-password"]
    assert str(settings.snapshots.dir) == mounts[claim["metadata"]["name"]]["mountPath"]
    assert port_names["metrics"] == settings.metrics.port and settings.metrics.host == "0.0.0.0"
    ca_dir = str(settings.kafka.ssl_cafile.parent)
    tls_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == ca_dir)
    tls_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == tls_mount["name"])
    assert settings.kafka.ssl_cafile.name in {i["path"] for i in tls_volume["secret"]["items"]}
    assert tls_volume["secret"]["secretName"] == objects["Secret"]["metadata"]["name"]


def test_k8s_gpu_overlay_requests_a_gpu_and_the_gpu_image():
    kustomization = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == [".."]
    patch = yaml.safe_load((K8S / "gpu" / kustomization["patches"][0]["path"]).read_text())
    assert (
        patch["kind"] == "StatefulSet"
        and patch["metadata"]["name"] == k8s_objects()["StatefulSet"]["metadata"]["name"]
    )
    container = patch["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith("-gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {item["name"]: item["value"] for item in container["env"]}
    assert load_settings(environ=env).training.device == "/GPU:0"


@pytest.mark.parametrize("path", sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.y*ml")))
def test_every_yaml_file_parses(path):
    documents = list(yaml.safe_load_all((DEPLOY / path).read_text()))
    assert documents and all(isinstance(d, dict) for d in documents)
