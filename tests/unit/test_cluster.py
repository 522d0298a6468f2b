"""distribution.* settings and TF_CONFIG: resolved at start, every error naming what is wrong."""

from __future__ import annotations

import json

import pytest

from streamvi.cluster import Cluster, resolve_cluster
from streamvi.config import load_settings
from streamvi.errors import ConfigError

TWO = "distribution.workers=[10.0.0.1:2222, 10.0.0.2:2222]"


def settings(*overrides: str):
    return load_settings(overrides=list(overrides), environ={})


def tf_config(cluster: dict, task: dict) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": task})}


def test_default_is_one_process_and_ignores_tf_config():
    config = settings()
    assert config.distribution.strategy == "none"
    env = tf_config({"worker": ["a:1", "b:2"]}, {"type": "worker", "index": 1})
    assert resolve_cluster(config.distribution, env) is None
    assert "distribution" in config.public_dict()  # the section is recorded in snapshots


def test_workers_from_settings():
    config = settings("distribution.strategy=multi_worker", TWO, "distribution.worker_index=1")
    cluster = resolve_cluster(config.distribution, {})
    assert cluster == Cluster(
        ("10.0.0.1:2222", "10.0.0.2:2222"),
        1,
        "settings",
        60.0,
        (("worker", ("10.0.0.1:2222", "10.0.0.2:2222")),),
    )
    assert cluster.size == 2 and not cluster.is_chief


def test_workers_from_the_environment_as_a_comma_list():
    env = {
        "STREAMVI_DISTRIBUTION__STRATEGY": "multi_worker",
        "STREAMVI_DISTRIBUTION__WORKERS": "h0:1,h1:2,h2:3",
        "STREAMVI_DISTRIBUTION__WORKER_INDEX": "2",
    }
    cluster = resolve_cluster(load_settings(environ=env).distribution, {})
    assert cluster is not None and cluster.workers == ("h0:1", "h1:2", "h2:3") and cluster.index == 2


def test_tf_config_as_tensorflow_reads_it_with_a_chief_first():
    config = settings("distribution.strategy=multi_worker", "distribution.collective_timeout_seconds=5")
    env = tf_config({"chief": ["c:1"], "worker": ["w0:1", "w1:1"]}, {"type": "worker", "index": 1})
    cluster = resolve_cluster(config.distribution, env)
    assert cluster is not None
    assert cluster.workers == ("c:1", "w0:1", "w1:1") and cluster.index == 2
    assert cluster.source == "TF_CONFIG" and cluster.collective_timeout_seconds == 5.0
    chief = resolve_cluster(
        config.distribution, tf_config({"chief": ["c:1"], "worker": ["w0:1"]}, {"type": "chief"})
    )
    assert chief is not None and chief.is_chief


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ([TWO], "distribution.worker_index is required"),
        (["distribution.worker_index=0"], "distribution.worker_index needs distribution.workers"),
        ([TWO, "distribution.worker_index=2"], "distribution.worker_index=2 is not a position"),
        (["distribution.collective_timeout_seconds=0"], "collective_timeout_seconds"),
        (["training.mixed_precision=mixed_float16"], "training.mixed_precision"),
    ],
)
def test_bad_settings_name_the_setting(overrides, needle):
    with pytest.raises(ConfigError) as caught:
        settings("distribution.strategy=multi_worker", *overrides)
    assert needle in str(caught.value)


def test_cluster_settings_without_multi_worker_do_not_apply():
    with pytest.raises(
        ConfigError, match=r"distribution.workers applies only with distribution.strategy=multi_worker"
    ):
        settings(TWO)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "set distribution.workers and distribution.worker_index, or the TF_CONFIG"),
        ({"TF_CONFIG": "{not json"}, "TF_CONFIG is not valid JSON"),
        ({"TF_CONFIG": "[]"}, "TF_CONFIG must be a JSON object"),
        (tf_config({"ps": ["p:1"], "worker": ["w:1"]}, {"type": "worker"}), "TF_CONFIG.cluster: jobs ['ps']"),
        (tf_config({"worker": []}, {"type": "worker"}), "TF_CONFIG.cluster.worker must be a non-empty list"),
        (tf_config({"worker": ["w:1", "w:1"]}, {"type": "worker"}), "repeated: w:1"),
        (tf_config({"worker": ["w:99999"]}, {"type": "worker"}), "TF_CONFIG.cluster.worker: 'w:99999'"),
        (tf_config({"worker": ["w:1"]}, {"type": "evaluator"}), "TF_CONFIG.task.type"),
        (tf_config({"worker": ["w:1"]}, {"type": "worker", "index": 1}), "TF_CONFIG.task.index must be 0..0"),
        (tf_config({"chief": ["c:1", "d:1"], "worker": ["w:1"]}, {"type": "chief"}), "exactly one address"),
    ],
)
def test_bad_tf_config_is_named(env, needle):
    config = settings("distribution.strategy=multi_worker")
    with pytest.raises(ConfigError) as caught:
        resolve_cluster(config.distribution, env)
    assert needle in str(caught.value)


def test_settings_and_tf_config_together_are_refused():
    config = settings("distribution.strategy=multi_worker", TWO, "distribution.worker_index=0")
    env = tf_config({"worker": ["a:1"]}, {"type": "worker"})
    with pytest.raises(ConfigError, match="both set"):
        resolve_cluster(config.distribution, env)
    with pytest.raises(ConfigError, match=r"distribution\.workers: 'nohost'"):
        resolve_cluster(
            settings(
                "distribution.strategy=multi_worker",
                "distribution.workers=[nohost]",
                "distribution.worker_index=0",
            ).distribution,
            {},
        )


def test_config_validate_checks_the_cluster_tf_config_included():
    from click.testing import CliRunner

    from streamvi.cli.main import cli

    env = {"STREAMVI_DISTRIBUTION__STRATEGY": "multi_worker", "TF_CONFIG": "{oops"}
    result = CliRunner().invoke(cli, ["config", "validate"], env=env)
    assert result.exit_code == 2 and "TF_CONFIG is not valid JSON" in result.output
    good = json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}})
    result = CliRunner().invoke(cli, ["config", "validate"], env={**env, "TF_CONFIG": good})
    assert result.exit_code == 0, result.output


def test_one_process_starts_no_cluster_and_workers_refuse_what_they_cannot_share_by_name():
    from streamvi.cluster import progress_file, start_cluster

    assert start_cluster(settings()) == (None, None)  # the default: one trainer, as before
    assert progress_file(None) == "progress.json"
    multi = ("distribution.strategy=multi_worker", TWO, "distribution.worker_index=1")
    exactly_once = settings(*multi, "processing.guarantee=exactly_once").processing
    assert exactly_once.transactional_id_for("g", 1) == "g-streamvi-worker-1"  # one producer each
    assert exactly_once.transactional_id_for("g") == "g-streamvi"
    # a score-function baseline's running average is all-reduced like the gradients
    assert settings(*multi, "training.estimator=score_function").training.baseline == "running_mean"
