"""Atomic, verified snapshots: a tf.train.Checkpoint plus meta.json in one directory per snapshot.

Write protocol: everything goes into a hidden temp directory, every file is fsynced, checksums are
recorded in meta.json (itself fsynced), then the directory is renamed into place and the parent
fsynced. A reader therefore sees either a whole snapshot or none; a snapshot damaged afterwards
(truncated or altered file) fails verification and is skipped in favour of the previous one.
Never pickle: model state is only ever a TensorFlow checkpoint.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import tensorflow as tf

from streamvi.errors import CorruptSnapshotError, SnapshotError, SnapshotLockedError
from streamvi.snapshots.base import CHECKPOINT_DIR, CHECKPOINT_PREFIX, SnapshotInfo, SnapshotReader

log = logging.getLogger(__name__)

__all__ = ["SnapshotInfo", "SnapshotLock", "SnapshotStore", "encode_offsets"]

META_FILE = "meta.json"
FORMAT_VERSION = 1
LOCK_FILE = ".lock"
PROGRESS_FILE = "progress.json"
#: A snapshot's tags (outside its checksums: see SnapshotStore.tag).
TAGS_FILE = "tags.json"
_PREFIX = "snapshot-"
_DISCARDED = ".discarded-"


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


class SnapshotStore(SnapshotReader):
    """A directory of snapshots on a local or shared filesystem (e.g. a ReadWriteMany volume):
    write atomically, keep the newest ``keep``, find the newest valid one."""

    def __init__(
        self,
        directory: str | Path,
        keep: int = 3,
        on_corrupt: Callable[[Path, str], None] | None = None,
        progress_file: str = PROGRESS_FILE,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.directory = Path(directory)
        #: The output-progress file's name (one per trainer worker sharing the store).
        self.progress_file = progress_file
        self.keep = keep
        self._on_corrupt = on_corrupt

    def lock(self) -> SnapshotLock:
        """Take the directory's exclusive writer lock for this process's life (see SnapshotLock)."""
        return SnapshotLock(self.directory)

    def write(
        self,
        checkpoint: tf.train.Checkpoint,
        step: int,
        meta: dict[str, Any],
        *,
        prune: bool = True,
        files: Mapping[str, bytes] | None = None,
    ) -> SnapshotInfo:
        """Write ``checkpoint`` with ``meta`` (offsets, counts, config...) and prune old snapshots.

        ``files`` (name: content) are written beside them, in the same atomic write and covered
        by the same checksums (e.g. the held-out sample). ``prune=False`` leaves pruning to the
        caller: an exactly-once snapshot is not trusted until its transaction commits, so the older
        ones must survive until then.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{_PREFIX}{step:012d}-{time.time_ns():020d}"
        temp = self.directory / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        try:
            temp.mkdir()
            checkpoint.write(str(temp / CHECKPOINT_DIR / CHECKPOINT_PREFIX))
            for relative, content in (files or {}).items():
                if relative in (META_FILE, CHECKPOINT_DIR) or "/" in relative or relative.startswith("."):
                    raise ValueError(f"snapshot file name {relative!r} is reserved or not a plain name")
                (temp / relative).write_bytes(content)
            checksums = {str(p.relative_to(temp)): _sha256(p) for p in _files(temp)}
            full_meta = dict(meta, step=int(step), format_version=FORMAT_VERSION, files=checksums)
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
        if prune:
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

    def valid(self) -> Iterator[SnapshotInfo]:
        """Snapshots that verify, newest first; corrupt ones are logged, reported and skipped."""
        for path in self.candidates():
            try:
                info = self.verify(path)
            except CorruptSnapshotError as exc:
                log.error("skipping corrupt snapshot: %s", exc)
                if self._on_corrupt is not None:
                    self._on_corrupt(path, str(exc))
                continue
            yield info

    def latest(self) -> SnapshotInfo | None:
        """The newest snapshot that verifies; corrupt ones are logged, reported and skipped."""
        return next(self.valid(), None)

    def discard(self, info: SnapshotInfo, reason: str) -> None:
        """Take a snapshot out of use (renamed aside, deleted by the next prune): it must never be
        restored, e.g. an exactly-once snapshot whose transaction did not commit."""
        target = self.directory / f"{_DISCARDED}{info.path.name}"
        log.warning("discarding snapshot %s: %s", info.path.name, reason)
        os.rename(info.path, target)
        _fsync_path(self.directory)

    def write_progress(self, offsets: dict[tuple[str, int], int]) -> None:
        """Record how far outputs have been sent (not fsynced: it only has to survive a process
        crash); a restart compares it with the snapshot's offsets to count replayed records."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / self.progress_file
        temp = path.with_name(f".{self.progress_file}.{os.getpid()}")
        temp.write_text(json.dumps({"offsets": encode_offsets(offsets)}), encoding="utf-8")
        os.replace(temp, path)

    def read_progress(self) -> dict[tuple[str, int], int]:
        try:
            data = json.loads((self.directory / self.progress_file).read_text(encoding="utf-8"))
            return SnapshotInfo(self.directory, data).offsets
        except (OSError, ValueError, AttributeError, TypeError):
            return {}

    def restore(self, checkpoint: tf.train.Checkpoint, info: SnapshotInfo, *, partial: bool = False) -> None:
        """Load ``info`` into ``checkpoint``: every saved value must match, or with ``partial``
        (a checkpoint of some of the saved objects) every object in ``checkpoint`` must be found."""
        status = checkpoint.read(info.checkpoint_prefix)
        if partial:
            status.expect_partial()
            status.assert_existing_objects_matched()
        else:
            status.assert_consumed()

    def tag(self, info: SnapshotInfo, name: str, detail: Mapping[str, Any]) -> None:
        """Tag a snapshot (e.g. ``pre-drift``: the last one before a detected drift, to roll back
        to). A tagged snapshot is never pruned. Tags live in ``tags.json`` beside its files, outside
        its checksums: tagging changes nothing that is verified or restored."""
        path = info.path / TAGS_FILE
        tags = read_tags(info.path)
        tags.append({"tag": name, "tagged_at": time.time(), **detail})
        temp = path.with_name(f".{TAGS_FILE}.{os.getpid()}")
        temp.write_text(json.dumps(tags, indent=2, sort_keys=True), encoding="utf-8")
        _fsync_path(temp)
        os.replace(temp, path)
        _fsync_path(info.path)

    def prune(self) -> None:
        """Delete all but the newest ``keep`` untagged snapshots, and temp directories left by a
        crash; tagged snapshots stay until a user removes them."""
        untagged = [path for path in self.candidates() if not (path / TAGS_FILE).is_file()]
        for path in untagged[self.keep :]:
            shutil.rmtree(path, ignore_errors=True)
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.startswith((".tmp-", _DISCARDED)):
                    shutil.rmtree(path, ignore_errors=True)


def read_tags(path: Path) -> list[dict[str, Any]]:
    """A snapshot's tags (see ``SnapshotStore.tag``), oldest first; none when it has no tags file."""
    try:
        tags = json.loads((path / TAGS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path}: unreadable {TAGS_FILE}: {exc}") from exc
    return [tag for tag in tags if isinstance(tag, dict)] if isinstance(tags, list) else []


class SnapshotLock:
    """An exclusive ``flock`` on ``<dir>/.lock``, holding the owner's pid: one writer per directory.

    The kernel releases it when the process dies, so a crash never leaves a stale lock behind.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise SnapshotLockedError(
                    f"snapshot directory {directory} is in use by another streamvi process (pid {holder}); "
                    "two writers would corrupt its state: stop that one or set snapshots.dir"
                ) from None
            raise SnapshotError(f"cannot lock snapshot directory {directory}: {exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
