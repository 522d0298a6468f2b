"""``streamvi run`` on a snapshots dir written under another model: a clear refusal, no traceback."""

from __future__ import annotations

import subprocess

import pytest
import tensorflow as tf

from streamvi.io.admin import ensure_topics
from streamvi.runtime import build_trainer, snapshot_meta
from streamvi.snapshots import SnapshotStore, encode_offsets
from tests.integration.faultkit import ROOT, STREAMVI, cli_env

pytestmark = pytest.mark.integration


def test_run_refuses_a_snapshot_of_another_latent_family_and_size(settings_factory):
    old = settings_factory("training.estimator=sgvb_a", "model.latent=gaussian", "model.latent_dim=4")
    new = settings_factory("training.estimator=sgvb_a", "model.latent=gumbel_softmax", "model.categories=4")
    assert old.snapshots.dir == new.snapshots.dir
    ensure_topics(new.kafka)
    trainer = build_trainer(old)
    meta = dict(snapshot_meta(old), offsets=encode_offsets({(new.kafka.input_topic, 0): 0}))
    store = SnapshotStore(old.snapshots.dir)
    written = store.write(tf.train.Checkpoint(**trainer.checkpoint_objects()), 0, meta)
    files = sorted(p.relative_to(written.path) for p in written.path.rglob("*"))

    result = subprocess.run(
        [*STREAMVI, "run", "--idle-timeout", "2"],
        env=cli_env(new),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "incompatible" not in result.stderr, result.stderr
    assert f"streamvi: error: snapshot {written.path} was written under other model settings" in result.stderr
    assert "  model.latent: snapshot gaussian, config gumbel_softmax\n" in result.stderr
    assert "  model.latent_dim: snapshot 4, config (does not apply)\n" in result.stderr
    assert "  model.categories: snapshot (does not apply), config 4\n" in result.stderr
    assert "point snapshots.dir at a new directory" in result.stderr
    assert "--set model.latent=gaussian --set model.latent_dim=4\n" in result.stderr
    assert "and remove model.categories from the config" in result.stderr
    # the snapshot is still there, whole and trusted
    assert store.candidates() == [written.path]
    assert sorted(p.relative_to(written.path) for p in written.path.rglob("*")) == files
    assert store.verify(written.path).meta == written.meta
