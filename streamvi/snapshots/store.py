"""Atomic, verified snapshots: a tf.train.Checkpoint plus meta.json in one directory per snapshot.

Write protocol: everything goes into a hidden temp directory, every file is fsynced, checksums are
recorded in meta.json (itself fsynced), then the directory is renamed into place and the parent
fsynced. A reader therefore sees either a whole snapshot or none; a snapshot damaged afterwards
(truncated or altered file) fails verification and is skipped in favour of the previous one.
Never pickle: model state is only ever a TensorFlow checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf

from streamvi.errors import CorruptSnapshotError, SnapshotError

log = logging.getLogger(__name__)

META_FILE = "meta.json"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_PREFIX = "state"
FORMAT_VERSION = 1
_PREFIX = "snapshot-"


@dataclass(frozen=True)
class SnapshotInfo:
    """A verified snapshot on disk and its metadata."""

    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def checkpoint_prefix(self) -> str:
        return str(self.path / CHECKPOINT_DIR / CHECKPOINT_PREFIX)

    @property
    def offsets(self) -> dict[tuple[str, int], int]:
        """Next offset to read per (topic, partition), as recorded at snapshot time."""
        return {
            (topic, int(partition)): int(offset)
            for topic, partitions in self.meta.get("offsets", {}).items()
            for partition, offset in partitions.items()
        }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path


def encode_offsets(offsets: dict[tuple[str, int], int]) -> dict[str, dict[str, int]]:
    """Offsets as JSON: {topic: {partition: next_offset}}."""
    out: dict[str, dict[str, int]] = {}
    for (topic, partition), offset in sorted(offsets.items()):
        out.setdefault(topic, {})[str(partition)] = int(offset)
    return out


class SnapshotStore:
    """A directory of snapshots: write atomically, keep the newest ``keep``, find the newest valid one."""

    def __init__(
        self,
        directory: str | Path,
        keep: int = 3,
        on_corrupt: Callable[[Path, str], None] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.directory = Path(directory)
        self.keep = keep
        self._on_corrupt = on_corrupt

    def write(self, checkpoint: tf.train.Checkpoint, step: int, meta: dict[str, Any]) -> SnapshotInfo:
        """Write ``checkpoint`` with ``meta`` (offsets, counts, config...) and prune old snapshots."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{_PREFIX}{step:012d}-{time.time_ns():020d}"
        temp = self.directory / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        try:
            temp.mkdir()
            checkpoint.write(str(temp / CHECKPOINT_DIR / CHECKPOINT_PREFIX))
            files = {str(p.relative_to(temp)): _sha256(p) for p in _files(temp)}
            full_meta = dict(meta, step=int(step), format_version=FORMAT_VERSION, files=files)
            full_meta.setdefault("created_at", time.time())
            meta_path = temp / META_FILE
            meta_path.write_text(json.dumps(full_meta, indent=2, sort_keys=True), encoding="utf-8")
            for path in _files(temp):
                _fsync_path(path)
            _fsync_path(temp / CHECKPOINT_DIR)
            _fsync_path(temp)
            final = self.directory / name
            os.rename(temp, final)
            _fsync_path(self.directory)
        except BaseException as exc:
            shutil.rmtree(temp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise SnapshotError(f"writing snapshot into {self.directory} failed: {exc}") from exc
            raise
        self.prune()
        return SnapshotInfo(final, full_meta)

    def candidates(self) -> list[Path]:
        """Snapshot directories, newest first (by step, then creation time)."""
        if not self.directory.is_dir():
            return []
        return sorted(
            (p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)),
            key=lambda p: p.name,
            reverse=True,
        )

    def verify(self, path: Path) -> SnapshotInfo:
        """Read and check one snapshot; raise CorruptSnapshotError naming what is wrong."""
        meta_path = path / META_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CorruptSnapshotError(f"{path}: unreadable {META_FILE}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise CorruptSnapshotError(f"{path}: unknown snapshot format")
        files = meta.get("files")
        if not isinstance(files, dict) or not files:
            raise CorruptSnapshotError(f"{path}: {META_FILE} lists no files")
        for relative, expected in files.items():
            file_path = path / relative
            if not file_path.is_file():
                raise CorruptSnapshotError(f"{path}: missing file {relative}")
            if _sha256(file_path) != expected:
                raise CorruptSnapshotError(f"{path}: checksum mismatch in {relative}")
        return SnapshotInfo(path, meta)

    def list(self) -> list[tuple[Path, SnapshotInfo | None, str | None]]:
        """Every snapshot, newest first, with its info when valid or the reason it is not."""
        result: list[tuple[Path, SnapshotInfo | None, str | None]] = []
        for path in self.candidates():
            try:
                result.append((path, self.verify(path), None))
            except CorruptSnapshotError as exc:
                result.append((path, None, str(exc)))
        return result

    def latest(self) -> SnapshotInfo | None:
        """The newest snapshot that verifies; corrupt ones are logged, reported and skipped."""
        for path in self.candidates():
            try:
                return self.verify(path)
            except CorruptSnapshotError as exc:
                log.error("skipping corrupt snapshot: %s", exc)
                if self._on_corrupt is not None:
                    self._on_corrupt(path, str(exc))
        return None

    def restore(self, checkpoint: tf.train.Checkpoint, info: SnapshotInfo, *, partial: bool = False) -> None:
        """Load ``info`` into ``checkpoint``; every saved value must match (unless ``partial``)."""
        status = checkpoint.read(info.checkpoint_prefix)
        if partial:
            status.expect_partial()
        else:
            status.assert_consumed()

    def prune(self) -> None:
        """Delete all but the newest ``keep`` snapshots, and temp directories left by a crash."""
        for path in self.candidates()[self.keep :]:
            shutil.rmtree(path, ignore_errors=True)
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.startswith(".tmp-"):
                    shutil.rmtree(path, ignore_errors=True)
