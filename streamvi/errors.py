"""The exception hierarchy: one root, so callers can catch everything streamvi raises on purpose."""

from __future__ import annotations


class StreamVIError(Exception):
    """Root of every error streamvi raises deliberately."""


class ConfigError(StreamVIError):
    """A setting is unknown, missing or has a bad value; the message names the setting."""


class SnapshotError(StreamVIError):
    """A snapshot cannot be written, read or verified."""


class CorruptSnapshotError(SnapshotError):
    """A snapshot failed its checksum or structure check and must not be used."""


class SnapshotLockedError(SnapshotError):
    """Another process holds the snapshot directory's writer lock."""


class OutputError(StreamVIError):
    """An output (latents, metrics, dead letters) could not be delivered to the broker."""


class CommitError(StreamVIError):
    """Consumed offsets (or a transaction holding them) could not be committed."""


class WorkerLostError(StreamVIError):
    """A collective of the trainer workers failed or timed out: another worker is gone. The group
    must restart (it resumes from the last snapshot)."""
