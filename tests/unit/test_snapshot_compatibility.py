"""A snapshot written under other structural settings is refused, clearly, before TensorFlow reads it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tensorflow as tf

from streamvi.config import ModelSettings, Settings, load_settings
from streamvi.errors import ConfigError, SnapshotError, StreamVIError
from streamvi.io.codecs import RecordDecoder
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.runtime import build_trainer, snapshot_meta
from streamvi.snapshots import SnapshotStore, encode_offsets
from streamvi.snapshots.compatibility import (
    NOT_APPLICABLE,
    STRUCTURAL_SETTINGS,
    SettingDifference,
    SnapshotConfigMismatchError,
    check_snapshot_matches,
    set_overrides,
    setting_differences,
    structural_setting_names,
)
from streamvi.stream import CheckpointPolicy, OnlineLoop, OutputTopics, ProcessingPolicy
from tests.unit.test_loop import records

SMALL = ["input.dim=6", "model.encoder_hidden=[8]", "training.batch_size=4", "training.estimator=sgvb_a"]
GAUSSIAN_4 = [*SMALL, "model.latent=gaussian", "model.latent_dim=4"]
GUMBEL = [*SMALL, "model.latent=gumbel_softmax"]
SCORE = [*GAUSSIAN_4, "training.estimator=score_function"]


def settings(*overrides: str) -> Settings:
    return load_settings(overrides=list(overrides), environ={})


def names(differences: list[SettingDifference]) -> list[str]:
    return [d.name for d in differences]


# -- the comparison ------------------------------------------------------------------------------


def test_every_differing_structural_setting_is_named_with_both_values():
    snapshot = settings(*GAUSSIAN_4, "training.optimizer=adam", "input.context_dim=0")
    config = settings(*GUMBEL, "training.optimizer=sgd", "input.context_dim=3")
    differences = setting_differences(snapshot, config)
    assert names(differences) == [
        "model.latent",
        "model.latent_dim",
        "input.context_dim",
        "training.optimizer",
    ]
    assert differences[0] == SettingDifference("model.latent", "gaussian", "gumbel_softmax")
    assert differences[1] == SettingDifference("model.latent_dim", 4, NOT_APPLICABLE)  # no z dim there


@pytest.mark.parametrize(
    ("base", "override"),
    [
        (GAUSSIAN_4, "input.dim=7"),
        (GAUSSIAN_4, "model.likelihood=gaussian"),
        (GAUSSIAN_4, "model.encoder_hidden=[8, 8]"),
        (GAUSSIAN_4, "model.decoder_hidden=[5]"),
        (GUMBEL, "model.temperature_rate=0.01"),
        (GAUSSIAN_4, "training.estimator=iwae"),
        (SCORE, "training.baseline=learned"),
        ([*SCORE, "training.baseline=learned"], "training.baseline_hidden=3"),
        (GAUSSIAN_4, "training.optimizer=rmsprop"),
        (GAUSSIAN_4, "training.mixed_precision=mixed_float16"),
    ],
)
def test_each_structural_setting_counts(base, override):
    name = override.split("=", 1)[0]
    assert names(setting_differences(settings(*base), settings(*base, override))) == [name]


def test_settings_that_do_not_shape_the_checkpoint_may_change_freely():
    changed = settings(
        *GAUSSIAN_4,
        "training.learning_rate=0.05",
        "training.batch_size=64",
        "training.samples=4",
        "training.seed=7",
        "training.clip_grad_norm=1.0",
        "training.max_batch_latency_ms=10",
        "input.format=f32",
        "kafka.input_topic=elsewhere",
        "kafka.group_id=other",
        "snapshots.dir=/somewhere/else",
        "snapshots.keep=9",
        "evaluation.heldout_fraction=0.2",
        "processing.guarantee=exactly_once",
        "metrics.port=0",
    )
    assert setting_differences(settings(*GAUSSIAN_4), changed) == []


def test_every_model_setting_is_structural_including_ones_added_later():
    assert set(structural_setting_names()) >= {f"model.{name}" for name in ModelSettings.model_fields}
    assert all(reason.strip() for reason in STRUCTURAL_SETTINGS.values())
    assert all(name.split(".", 1)[0] in Settings.model_fields for name in structural_setting_names())


def test_a_key_missing_from_an_old_snapshot_stands_for_that_settings_default():
    old = settings(*GAUSSIAN_4).public_dict()
    del old["model"]["likelihood"]  # as if the snapshot predates the setting
    del old["model"]["min_posterior_scale"]
    assert setting_differences(old, settings(*GAUSSIAN_4)) == []
    changed = setting_differences(old, settings(*GAUSSIAN_4, "model.likelihood=continuous_bernoulli"))
    assert changed == [SettingDifference("model.likelihood", "bernoulli", "continuous_bernoulli")]


def test_a_section_missing_from_an_old_snapshot_compares_every_key_to_defaults():
    old = {"model": {"latent_dim": 4}}
    config = settings("model.latent_dim=4", "input.dim=12")
    assert setting_differences(old, config) == [SettingDifference("input.dim", 64, 12)]


# -- the error -----------------------------------------------------------------------------------


def test_the_error_names_each_setting_and_both_ways_out(tmp_path):
    path = tmp_path / "snapshots" / "snapshot-000000000012-1"
    with pytest.raises(SnapshotConfigMismatchError) as caught:
        check_snapshot_matches(path, settings(*GAUSSIAN_4), settings(*GUMBEL))
    error = caught.value
    assert (
        isinstance(error, ConfigError)
        and isinstance(error, SnapshotError)
        and isinstance(error, StreamVIError)
    )
    message = str(error)
    assert str(path) in message
    assert "model.latent: snapshot gaussian, config gumbel_softmax" in message
    assert "model.latent_dim: snapshot 4, config (does not apply)" in message
    assert "point snapshots.dir at a new directory" in message
    assert "--set model.latent=gaussian --set model.latent_dim=4" in message
    assert names(list(error.differences)) == ["model.latent", "model.latent_dim"]


def test_the_suggested_overrides_rebuild_the_snapshots_settings():
    snapshot = settings(
        *GAUSSIAN_4,
        "model.encoder_hidden=[16, 8]",
        "model.observation_scale=0.3",
        "model.likelihood=gaussian",
        "training.mixed_precision=off",
        "training.optimizer=adamw",
    )
    config = settings(*GUMBEL, "training.mixed_precision=mixed_bfloat16")
    differences = setting_differences(snapshot, config)
    assert len(differences) == 7
    overrides = [shlex.split(option)[1] for option in set_overrides(differences)]
    assert (
        setting_differences(
            snapshot, settings(*GUMBEL, "training.mixed_precision=mixed_bfloat16", *overrides)
        )
        == []
    )


def test_settings_that_do_not_apply_compare_as_defaults_and_get_no_override(tmp_path):
    # a snapshot written before public_dict left them out holds every key, applicable or not
    old = settings(*GAUSSIAN_4).model_dump(mode="json")
    assert "categories" in old["model"] and "baseline" in old["training"]
    assert setting_differences(old, settings(*GAUSSIAN_4)) == []
    assert setting_differences(old, settings(*GAUSSIAN_4).public_dict()) == []

    config = settings(*GUMBEL, "model.categories=4")
    differences = setting_differences(old, config)
    assert SettingDifference("model.categories", NOT_APPLICABLE, 4) in differences
    overrides = set_overrides(differences)
    assert overrides == ["--set model.latent=gaussian", "--set model.latent_dim=4"]
    message = str(SnapshotConfigMismatchError(tmp_path / "snap", differences))
    assert "model.categories: snapshot (does not apply), config 4" in message
    assert "and remove model.categories from the config" in message
    # with the suggested settings and without the one named, the config builds the snapshot's model
    rebuilt = settings(*GUMBEL, *(shlex.split(option)[1] for option in overrides))
    assert setting_differences(old, rebuilt) == []


def test_matching_settings_pass():
    check_snapshot_matches(
        Path("snap"), settings(*GAUSSIAN_4), settings(*GAUSSIAN_4, "training.learning_rate=0.1")
    )


# -- the loop refuses it at start, before TensorFlow reads it, and leaves it alone ---------------


def make_loop(
    config: Settings, store: SnapshotStore, source: MemorySource, exactly_once: bool = False
) -> OnlineLoop:
    return OnlineLoop(
        source=source,
        sink=MemorySink(transactional=exactly_once),
        decoder=RecordDecoder("json", config.input.dim, 4096),
        trainer=build_trainer(config),
        store=store,
        topics=OutputTopics("lat", "met", "dlq"),
        policy=CheckpointPolicy(every_steps=1, every_seconds=3600),
        max_batch_latency_seconds=5.0,
        snapshot_meta=snapshot_meta(config),
        max_poll_records=4,
        processing=ProcessingPolicy(exactly_once=exactly_once),
    )


def write_snapshot(config: Settings, directory: Path, next_offset: int) -> Path:
    trainer = build_trainer(config)
    meta = dict(snapshot_meta(config), offsets=encode_offsets({("in", 0): next_offset}))
    return SnapshotStore(directory).write(tf.train.Checkpoint(**trainer.checkpoint_objects()), 0, meta).path


def test_a_restart_under_another_latent_family_fails_cleanly_and_keeps_the_snapshots(tmp_path):
    first = make_loop(settings(*GAUSSIAN_4), SnapshotStore(tmp_path), MemorySource(records(8)))
    first.restore()
    first.run(max_records=8)
    store = SnapshotStore(tmp_path)
    before = [(path.name, sorted(p.name for p in path.rglob("*"))) for path in store.candidates()]
    assert before

    second = make_loop(settings(*GUMBEL), store, MemorySource(records(16)))
    initial = [v.numpy().copy() for v in second.trainer.model.trainable_variables]
    with pytest.raises(
        SnapshotConfigMismatchError, match=re.escape("model.latent: snapshot gaussian, config gumbel_softmax")
    ) as caught:
        second.restore()
    assert [(path.name, sorted(p.name for p in path.rglob("*"))) for path in store.candidates()] == before
    assert all(store.verify(path) for path in store.candidates())
    assert all(
        (a == v.numpy()).all() for a, v in zip(initial, second.trainer.model.trainable_variables, strict=True)
    )

    # the second way out: the suggested overrides restore the old model and resume where it stopped
    overrides = [shlex.split(option)[1] for option in set_overrides(caught.value.differences)]
    resumed = make_loop(settings(*GUMBEL, *overrides), store, MemorySource(records(16)))
    info = resumed.restore()
    assert info is not None and info.offsets == {("in", 0): 8} and resumed.trainer.step == first.trainer.step


def test_under_exactly_once_a_mismatching_snapshot_is_refused_not_discarded(tmp_path):
    # offsets ahead of the (empty) committed ones: a matching snapshot like it would be discarded
    path = write_snapshot(settings(*GAUSSIAN_4), tmp_path, next_offset=5)
    loop = make_loop(settings(*GUMBEL), SnapshotStore(tmp_path), MemorySource(records(8)), exactly_once=True)
    with pytest.raises(
        SnapshotConfigMismatchError, match=re.escape("model.latent_dim: snapshot 4, config (does not apply)")
    ):
        loop.restore()
    assert SnapshotStore(tmp_path).candidates() == [path]


def test_a_change_of_non_structural_settings_restores(tmp_path):
    write_snapshot(settings(*GAUSSIAN_4), tmp_path, next_offset=3)
    changed = settings(*GAUSSIAN_4, "training.learning_rate=0.05", "training.batch_size=2")
    info = make_loop(changed, SnapshotStore(tmp_path), MemorySource(records(8))).restore()
    assert info is not None and info.offsets == {("in", 0): 3}
