from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from streamvi.config import Settings, load_settings, parse_overrides
from streamvi.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_are_valid_and_frozen():
    settings = load_settings(environ={})
    assert settings.kafka.input_topic == "streamvi.input"
    assert settings.training.estimator == "sgvb_b"
    with pytest.raises(ValidationError):
        settings.training.batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml", "production.example.yaml"])
def test_shipped_configs_load(name):
    settings = load_settings(CONFIGS / name, environ={})
    assert isinstance(settings, Settings)


def test_precedence_file_then_env_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  batch_size: 16\n  learning_rate: 0.01\nkafka:\n  group_id: from-file\n")
    env = {"STREAMVI_TRAINING__BATCH_SIZE": "32", "STREAMVI_KAFKA__GROUP_ID": "from-env"}
    settings = load_settings(path, ["kafka.group_id=from-set"], environ=env)
    assert settings.training.batch_size == 32  # env beats file
    assert settings.training.learning_rate == 0.01  # file beats default
    assert settings.kafka.group_id == "from-set"  # --set beats env


def test_set_parses_yaml_values():
    assert parse_overrides(["model.encoder_hidden=[32, 16]", "training.jit_compile=false"]) == {
        "model": {"encoder_hidden": [32, 16]},
        "training": {"jit_compile": False},
    }


def test_bootstrap_servers_accepts_comma_string():
    settings = load_settings(environ={"STREAMVI_KAFKA__BOOTSTRAP_SERVERS": "a:1, b:2"})
    assert settings.kafka.bootstrap_servers == ["a:1", "b:2"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["training.batch_size=0"], "training.batch_size"),
        (["training.pipeline_depth=0"], "training.pipeline_depth"),
        (["processing.gil_switch_interval_ms=0"], "processing.gil_switch_interval_ms"),
        (["training.bacth_size=3"], "training.bacth_size"),
        (["nosuch.key=1"], "nosuch"),
        (["input.format=xml"], "input.format"),
        (["model.likelihood=cauchy"], "model.likelihood"),
        (["model.encoder_hidden=[64, -1]"], "model.encoder_hidden"),
        (["snapshots.keep=0"], "snapshots.keep"),
        (["metrics.port=70000"], "metrics.port"),
        (["kafka.security_protocol=SASL_SSL"], "kafka.sasl_mechanism"),
    ],
)
def test_bad_settings_fail_naming_the_key(overrides, named):
    with pytest.raises(ConfigError) as info:
        load_settings(overrides=overrides, environ={})
    assert named in str(info.value)


def test_unknown_environment_section_is_rejected():
    with pytest.raises(ConfigError, match="STREAMVI_TRAINNG__SEED"):
        load_settings(environ={"STREAMVI_TRAINNG__SEED": "1"})


def test_unknown_key_in_file_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"training\.learning_rat"):
        load_settings(path, environ={})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_settings(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not sections\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad, environ={})


def test_secrets_are_masked_and_passed_to_clients():
    settings = load_settings(
        overrides=[
            "kafka.security_protocol=SASL_SSL",
            "kafka.sasl_mechanism=SCRAM-SHA-512",
            "kafka.sasl_username=svc",
            "kafka.sasl_password=hunter2",
        ],
        environ={},
    )
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.public_dict())
    options = settings.kafka.client_options()
    assert options["sasl_plain_password"] == "hunter2"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["security_protocol"] == "SASL_SSL"


def test_topics_must_differ():
    with pytest.raises(ConfigError, match="must all differ"):
        load_settings(overrides=["kafka.latents_topic=streamvi.input"], environ={})
