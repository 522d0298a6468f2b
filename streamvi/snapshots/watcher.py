"""Hot reload for encoder replicas: find the newest trusted snapshot, load it beside the model in
use, and hand it over whole, so the switch happens between two batches.

A background thread looks every ``interval_seconds``. The newest snapshot that verifies, fits the
replica's config and is trusted (:mod:`streamvi.snapshots.trust`) is loaded into a fresh model,
whose scoring function is compiled before it is offered; the loop takes it before its next batch.
A snapshot that fails its checksum or does not fit the config is skipped once, with an error and
a counter, and the replica keeps serving what it has.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf

from streamvi.anomaly.monitor import STATE_FILE, AnomalyMonitor
from streamvi.errors import CorruptSnapshotError, SnapshotError
from streamvi.snapshots.base import SnapshotInfo, SnapshotReader
from streamvi.snapshots.compatibility import check_snapshot_matches
from streamvi.snapshots.trust import SnapshotTrust
from streamvi.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A snapshot's parameters in a model that only scores, ready to use."""

    trainer: Trainer
    info: SnapshotInfo
    #: The trainer's anomaly reference as the snapshot saved it (read only), or None: off.
    anomaly: AnomalyMonitor | None = None

    @property
    def name(self) -> str:
        return self.info.name


class ReloadEvents:
    """What the watcher reports: a model switched to, or a snapshot skipped and why."""

    def loaded(self, model: LoadedModel) -> None:
        """``model`` is ready (not yet in use)."""

    def failed(self, path: Path, reason: str, detail: str) -> None:
        """The snapshot at ``path`` was skipped: ``reason`` is corrupt, config_mismatch or load_error."""


class SnapshotWatcher:
    """Finds and loads the newest trusted snapshot; ``take`` hands over a newer one once loaded."""

    def __init__(
        self,
        reader: SnapshotReader,
        trust: SnapshotTrust,
        build_trainer: Callable[[], Trainer],
        config: Mapping[str, Any] | None,
        interval_seconds: float,
        events: ReloadEvents | None = None,
        build_anomaly: Callable[[], AnomalyMonitor | None] = lambda: None,
    ) -> None:
        self.reader = reader
        self.build_anomaly = build_anomaly
        self.trust = trust
        self.build_trainer = build_trainer
        self.config = config
        self.interval_seconds = interval_seconds
        self.events = events or ReloadEvents()
        self._lock = threading.Lock()
        self._ready: LoadedModel | None = None
        #: The snapshot in use or about to be (the newest one loaded).
        self._loaded: str | None = None
        self._rejected: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop's side -------------------------------------------------------------------------------
    def take(self) -> LoadedModel | None:
        """The newest model loaded since the last call, or None (called between batches)."""
        with self._lock:
            ready, self._ready = self._ready, None
        return ready

    def wait_for_first(
        self, stop: threading.Event, beat: Callable[[], None] = lambda: None
    ) -> LoadedModel | None:
        """Block until a trusted snapshot is loaded (None if ``stop`` is set first)."""
        waiting_logged = False
        while not stop.is_set():
            beat()
            self.check()
            ready = self.take()
            if ready is not None:
                return ready
            if not waiting_logged:
                log.info(
                    "waiting for a trusted snapshot to serve (checking every %.1fs)", self.interval_seconds
                )
                waiting_logged = True
            stop.wait(self.interval_seconds)
        return None

    def start(self) -> None:
        """Look for newer snapshots every ``interval_seconds`` on a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="streamvi-reload", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop looking (waits for a load in progress); ``start`` may start again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stop.clear()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                self.check()
            except Exception:  # a store that cannot be read now may be readable at the next look
                log.exception("looking for a newer snapshot failed; keeping the model in use")

    # -- finding and loading -----------------------------------------------------------------------------
    def check(self) -> LoadedModel | None:
        """Load the newest trusted snapshot if it is not the one in use; return it when loaded."""
        target = self._newest_trusted()
        if target is None or target.name == self._loaded:
            return None
        try:
            model = self._load(target)
        except (SnapshotError, OSError, ValueError, tf.errors.OpError) as exc:
            self._reject(target.path, "load_error", str(exc))
            return None
        with self._lock:
            self._ready, self._loaded = model, model.name
        log.info("loaded snapshot %s (step %d); switching at the next batch", model.name, model.info.step)
        self.events.loaded(model)
        return model

    def _newest_trusted(self) -> SnapshotInfo | None:
        """The newest snapshot that verifies, fits the config and is trusted, newest first; a newer
        one that is only not trusted yet is looked at again next time."""
        verified: list[SnapshotInfo] = []
        for path in self.reader.candidates():
            if path.name in self._rejected:
                continue
            if path.name == self._loaded:
                verified.append(SnapshotInfo(path, {}))  # in use: trusted, no need to read it again
                break
            try:
                info = self.reader.verify(path)
            except CorruptSnapshotError as exc:
                if path.exists():  # pruned or discarded while being read is no corruption
                    self._reject(path, "corrupt", str(exc))
                continue
            if not self._fits(info):
                continue
            verified.append(info)
        if not verified:
            return None
        if verified[-1].name == self._loaded:
            trusted = [*self.trust.trusted(verified[:-1]), True]
        else:
            trusted = self.trust.trusted(verified)
        return next((info for info, ok in zip(verified, trusted, strict=True) if ok), None)

    def _fits(self, info: SnapshotInfo) -> bool:
        snapshot_config = info.meta.get("config")
        if self.config is None or not isinstance(snapshot_config, Mapping):
            return True
        try:
            check_snapshot_matches(info.path, snapshot_config, self.config)
        except SnapshotError as exc:
            self._reject(info.path, "config_mismatch", str(exc))
            return False
        return True

    def _reject(self, path: Path, reason: str, detail: str) -> None:
        self._rejected.add(path.name)
        log.error("skipping snapshot %s (%s), keeping the model in use: %s", path.name, reason, detail)
        self.events.failed(path, reason, detail)

    def _load(self, info: SnapshotInfo) -> LoadedModel:
        """A fresh model with the snapshot's parameters, its scoring step compiled (off the loop)."""
        trainer = self.build_trainer()
        objects = trainer.checkpoint_objects()
        # The optimizer's state is not needed to score; everything else the snapshot has is.
        checkpoint = tf.train.Checkpoint(
            model=objects["model"], estimator=objects["estimator"], step=objects["step"], rng=objects["rng"]
        )
        self.reader.restore(checkpoint, info, partial=True)
        trainer.warm_up_scoring()  # trace and compile the scoring step now, not on the loop
        return LoadedModel(trainer, info, self._anomaly(info))

    def _anomaly(self, info: SnapshotInfo) -> AnomalyMonitor | None:
        """The snapshot's anomaly reference (a snapshot without one: uncalibrated, flags nothing)."""
        monitor = self.build_anomaly()
        if monitor is not None and STATE_FILE in info.meta.get("files", {}):
            monitor.load((info.path / STATE_FILE).read_bytes())
        return monitor
