from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from streamvi.errors import CorruptSnapshotError
from streamvi.snapshots import SnapshotStore
from streamvi.snapshots.loading import find_snapshot, load_trainer
from streamvi.snapshots.store import META_FILE
from tests.unit.test_trainer import data, make


def checkpoint(trainer) -> tf.train.Checkpoint:
    return tf.train.Checkpoint(**trainer.checkpoint_objects())


def test_restore_resumes_bit_for_bit(tmp_path):
    x = data(8)
    original = make()
    for _ in range(3):
        original.train(x.copy(), 8)
    store = SnapshotStore(tmp_path)
    info = store.write(checkpoint(original), original.step, {"offsets": {"t": {"0": 24}}})
    expected = [original.train(x.copy(), 8) for _ in range(2)]

    resumed = make("training.seed=12345")  # different init and RNG: the snapshot must override both
    store.restore(checkpoint(resumed), store.latest())
    assert resumed.step == 3
    got = [resumed.train(x.copy(), 8) for _ in range(2)]
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a.scores.bound, b.scores.bound)  # same RNG stream
        assert a.loss == b.loss and a.step == b.step
    for a, b in zip(original.model.trainable_variables, resumed.model.trainable_variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # same optimizer state took the same steps
    assert info.offsets == {("t", 0): 24}


def test_keeps_only_the_newest_k_and_cleans_crash_leftovers(tmp_path):
    trainer = make()
    (tmp_path / ".tmp-snapshot-crashed").mkdir()
    store = SnapshotStore(tmp_path, keep=2)
    steps = []
    for _ in range(4):
        trainer.train(data(8), 8)
        steps.append(store.write(checkpoint(trainer), trainer.step, {}).step)
    assert [p.name.split("-")[1] for p in store.candidates()] == [f"{s:012d}" for s in steps[::-1][:2]]
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "meta"])
def test_corrupt_newest_snapshot_falls_back_to_previous(tmp_path, damage):
    trainer = make()
    seen = []
    store = SnapshotStore(tmp_path, keep=3, on_corrupt=lambda path, reason: seen.append(reason))
    trainer.train(data(8), 8)
    good = store.write(checkpoint(trainer), trainer.step, {"offsets": {"t": {"0": 8}}})
    trainer.train(data(8), 8)
    bad = store.write(checkpoint(trainer), trainer.step, {"offsets": {"t": {"0": 16}}})
    target = max(
        (p for p in (bad.path / "checkpoint").iterdir() if p.name.startswith("state.data")),
        key=lambda p: p.stat().st_size,
    )
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "flip":
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "delete":
        target.unlink()
    else:
        (bad.path / META_FILE).write_text("{truncated")
    with pytest.raises(CorruptSnapshotError):
        store.verify(bad.path)
    latest = store.latest()
    assert latest is not None and latest.path == good.path
    assert latest.offsets == {("t", 0): 8}
    assert len(seen) == 1


def test_meta_holds_checksums_and_caller_fields(tmp_path):
    trainer = make()
    info = SnapshotStore(tmp_path).write(checkpoint(trainer), 0, {"counts": {"records_trained": 0}})
    meta = json.loads((info.path / META_FILE).read_text())
    assert meta["step"] == 0 and meta["counts"] == {"records_trained": 0}
    assert meta["files"] and all(len(digest) == 64 for digest in meta["files"].values())


def test_load_trainer_from_snapshot_alone(tmp_path):
    from streamvi.config import load_settings
    from streamvi.runtime import build_trainer, snapshot_meta

    settings = load_settings(
        overrides=["input.dim=6", "model.latent_dim=3", "model.encoder_hidden=[5]", "training.batch_size=4"],
        environ={},
    )
    trainer = build_trainer(settings)
    trainer.train(data(4), 4)
    SnapshotStore(tmp_path).write(checkpoint(trainer), trainer.step, snapshot_meta(settings))
    info = find_snapshot(tmp_path)
    loaded_settings, loaded = load_trainer(info)
    assert loaded_settings == settings
    x = data(10, seed=3)
    np.testing.assert_allclose(loaded.evaluate(x).z_loc, trainer.evaluate(x).z_loc, rtol=1e-6)
