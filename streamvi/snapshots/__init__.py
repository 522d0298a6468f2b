"""Snapshots of the model, optimizer, step, RNG and input offsets: atomic write, verify, retain, restore."""

from streamvi.snapshots.store import SnapshotInfo, SnapshotStore, encode_offsets

__all__ = ["SnapshotInfo", "SnapshotStore", "encode_offsets"]
