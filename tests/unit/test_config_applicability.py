"""A setting that cannot apply under the variant another setting chose is refused at load, by name."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from streamvi.config import Settings, inapplicable_reason, load_settings, without_inapplicable
from streamvi.errors import ConfigError
from streamvi.snapshots.loading import settings_of

#: (the setting, a value for it, the choice under which it applies, the default choice it is refused under)
CASES = [
    ("model.latent_dim", "3", "model.latent=gaussian", "model.latent=gumbel_softmax"),
    ("model.min_posterior_scale", "0.01", "model.latent=gaussian", "model.latent=gumbel_softmax"),
    *(
        (name, value, "model.latent=gumbel_softmax", "model.latent=gaussian")
        for name, value in [
            ("model.categorical_variables", "2"),
            ("model.categories", "4"),
            ("model.temperature_start", "2.0"),
            ("model.temperature_floor", "0.1"),
            ("model.temperature_rate", "0.01"),
            ("model.straight_through", "true"),
        ]
    ),
    ("model.observation_scale", "0.3", "model.likelihood=gaussian", "model.likelihood=bernoulli"),
    ("model.learn_observation_scale", "true", "model.likelihood=gaussian", "model.likelihood=poisson"),
    ("model.binomial_total_count", "16", "model.likelihood=binomial", "model.likelihood=bernoulli"),
    ("training.baseline", "learned", "training.estimator=score_function", "training.estimator=sgvb_b"),
    ("training.baseline_decay", "0.5", "training.estimator=score_function", "training.estimator=iwae"),
    (
        "processing.transactional_id",
        "tx-1",
        "processing.guarantee=exactly_once",
        "processing.guarantee=at_least_once",
    ),
    (
        "processing.transaction_timeout_ms",
        "90000",
        "processing.guarantee=exactly_once",
        "processing.guarantee=at_least_once",
    ),
]


def ids(case) -> str:
    return case[0]


def load(*overrides: str, environ: dict[str, str] | None = None) -> Settings:
    return load_settings(overrides=list(overrides), environ=environ or {})


@pytest.mark.parametrize("case", CASES, ids=[ids(c) for c in CASES])
def test_a_setting_is_refused_by_name_where_it_cannot_apply_and_taken_where_it_does(case):
    name, value, applies, other = case
    with pytest.raises(ConfigError) as caught:
        load(other, f"{name}={value}")
    message = str(caught.value)
    choice, chosen = other.split("=")
    needed = applies.split("=")[1]
    assert f"{name} applies only with {applies}" in message
    assert f"({choice} is {chosen}); remove it or set {choice}={needed}" in message

    section, key = name.split(".")
    accepted = getattr(getattr(load(applies, f"{name}={value}"), section), key)
    assert accepted == yaml.safe_load(value)


def test_the_message_for_a_gaussian_latent():
    with pytest.raises(ConfigError) as caught:
        load("model.temperature_start=2.0")
    assert str(caught.value) == (
        "invalid configuration:\n"
        "  model.temperature_start applies only with model.latent=gumbel_softmax (model.latent is gaussian); "
        "remove it or set model.latent=gumbel_softmax"
    )


def test_nested_conditions_name_each_unmet_one():
    with pytest.raises(ConfigError) as caught:
        load("model.min_observation_scale=0.01")
    assert (
        "model.min_observation_scale applies only with model.likelihood=gaussian and "
        "model.learn_observation_scale=true (model.likelihood is bernoulli, model.learn_observation_scale "
        "is false); remove it or set model.likelihood=gaussian and model.learn_observation_scale=true"
    ) in str(caught.value)
    with pytest.raises(ConfigError, match=r"\(model.learn_observation_scale is false\); remove it or set "):
        load("model.likelihood=gaussian", "model.min_observation_scale=0.01")
    with pytest.raises(
        ConfigError, match=r"training.baseline_hidden applies only with .*\(training.baseline is"
    ):
        load("training.estimator=score_function", "training.baseline_hidden=8")
    with pytest.raises(ConfigError, match=r"training.baseline_decay .*\(training.baseline is none\)"):
        load("training.estimator=score_function", "training.baseline=none", "training.baseline_decay=0.5")
    settings = load(
        "training.estimator=score_function", "training.baseline=learned", "training.baseline_hidden=8"
    )
    assert settings.training.baseline_hidden == 8
    settings = load(
        "model.likelihood=gaussian", "model.learn_observation_scale=true", "model.min_observation_scale=0.01"
    )
    assert settings.model.min_observation_scale == 0.01


def test_every_offending_setting_is_named_at_once():
    with pytest.raises(ConfigError) as caught:
        load("model.categories=4", "model.straight_through=true", "training.baseline=none")
    lines = str(caught.value).splitlines()[1:]
    assert [line.split()[0] for line in lines] == [
        "model.categories",
        "model.straight_through",
        "training.baseline",
    ]


def test_refused_from_a_file_and_from_the_environment_alike(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  latent: gumbel_softmax\n  categories: 4\n  latent_dim: 3\n")
    with pytest.raises(
        ConfigError, match=re.escape("model.latent_dim applies only with model.latent=gaussian")
    ):
        load_settings(path, environ={})
    with pytest.raises(
        ConfigError, match=re.escape("model.categories applies only with model.latent=gumbel_softmax")
    ):
        load(environ={"STREAMVI_MODEL__CATEGORIES": "4"})
    # the choice may come from any source: here the environment, and the file tunes that variant
    path.write_text("model:\n  categories: 4\n")
    settings = load_settings(path, environ={"STREAMVI_MODEL__LATENT": "gumbel_softmax"})
    assert (settings.model.latent, settings.model.categories) == ("gumbel_softmax", 4)
    with pytest.raises(ValidationError, match=re.escape("model.categories applies only")):
        Settings(model={"categories": 4})  # not only through load_settings


def test_a_setting_left_at_its_default_is_fine_and_still_readable():
    settings = load("model.latent=gumbel_softmax", "training.estimator=iwae")
    assert settings.model.latent_dim == 8 and settings.training.baseline == "running_mean"


def test_consistency_checks_of_settings_that_do_not_apply_give_way_to_the_refusal():
    # floor above start would be a contradiction under gumbel_softmax; under gaussian, both are idle
    with pytest.raises(ConfigError) as caught:
        load("model.temperature_floor=2.0")
    assert "model.temperature_floor applies only with model.latent=gumbel_softmax" in str(caught.value)
    with pytest.raises(ConfigError, match=re.escape("must not exceed model.temperature_start")):
        load("model.latent=gumbel_softmax", "model.temperature_floor=2.0")


def test_public_dict_leaves_out_what_does_not_apply_and_loads_again(tmp_path):
    settings = load(
        "model.latent=gumbel_softmax",
        "model.categories=4",
        "model.likelihood=gaussian",
        "training.estimator=score_function",
        "processing.guarantee=exactly_once",
    )
    shown = settings.public_dict()
    assert "latent_dim" not in shown["model"] and "min_posterior_scale" not in shown["model"]
    assert shown["model"]["categories"] == 4 and shown["model"]["observation_scale"] == 0.1
    assert "min_observation_scale" not in shown["model"]  # the scale is not learned
    assert shown["training"]["baseline"] == "running_mean" and "baseline_hidden" not in shown["training"]
    assert shown["processing"]["transaction_timeout_ms"] == 60_000
    defaults = Settings().public_dict()
    assert "categories" not in defaults["model"] and "baseline" not in defaults["training"]
    assert "transactional_id" not in defaults["processing"]
    # `streamvi config show > file` gives a config that loads to the same settings
    path = tmp_path / "shown.yaml"
    path.write_text(yaml.safe_dump(shown))
    assert load_settings(path, environ={}) == settings


def test_a_snapshot_config_recorded_with_every_key_still_loads():
    settings = load("model.latent=gumbel_softmax", "model.categories=4", "training.estimator=sgvb_a")
    everything = settings.model_dump(mode="json")  # as snapshots recorded it before this check
    with pytest.raises(ValidationError):
        Settings(**everything)
    assert Settings(**without_inapplicable(everything)) == settings
    info = types.SimpleNamespace(meta={"config": everything}, path=Path("snapshot-1"))
    assert settings_of(info) == settings  # type: ignore[arg-type]


def test_inapplicable_reason_reads_settings_and_their_data():
    gumbel = load("model.latent=gumbel_softmax")
    assert inapplicable_reason(gumbel, "model.categories") is None
    assert inapplicable_reason(gumbel, "model.latent_dim") is not None
    assert inapplicable_reason(gumbel.public_dict(), "model.latent_dim") is not None
    assert inapplicable_reason({}, "model.latent_dim") is None  # defaults: a gaussian latent
    assert inapplicable_reason({}, "model.categories") is not None
    assert inapplicable_reason({}, "kafka.group_id") is None
