"""Loading a trainer from a snapshot alone: its meta.json carries the config that built it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import tensorflow as tf
from pydantic import ValidationError

from streamvi.config import Settings, without_inapplicable
from streamvi.errors import SnapshotError
from streamvi.snapshots.store import META_FILE, SnapshotInfo, SnapshotStore
from streamvi.training.trainer import Trainer


def find_snapshot(path: str | Path) -> SnapshotInfo:
    """``path`` is one snapshot directory, or a snapshots directory whose newest valid one is used."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return SnapshotStore(path.parent).verify(path)
    info = SnapshotStore(path).latest()
    if info is None:
        raise SnapshotError(f"{path}: no valid snapshot found")
    return info


def settings_of(info: SnapshotInfo) -> Settings:
    """The settings a snapshot was written with (secrets are masked in it).

    A snapshot older than the check against settings that cannot apply recorded every key of
    every section; those that do not apply to its model are dropped, as they never had an effect.
    """
    try:
        config = info.meta["config"]
        if not isinstance(config, Mapping):
            raise TypeError(f"config is a {type(config).__name__}, not a mapping")
        return Settings(**without_inapplicable(config))
    except (KeyError, TypeError, ValidationError) as exc:
        raise SnapshotError(f"{info.path}: meta.json has no usable config: {exc}") from exc


def load_trainer(info: SnapshotInfo) -> tuple[Settings, Trainer]:
    """Rebuild the model, optimizer and RNG a snapshot describes and load its values."""
    from streamvi.runtime import build_trainer

    settings = settings_of(info)
    trainer = build_trainer(settings)
    SnapshotStore(info.path.parent).restore(tf.train.Checkpoint(**trainer.checkpoint_objects()), info)
    return settings, trainer
