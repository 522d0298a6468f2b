"""The held-out sample a snapshot keeps: the newest held-out records, for reports and restarts.

Saved as ``heldout_sample.npz`` (two float32 arrays, ``x`` [n, input.dim] and ``c``
[n, input.context_dim]; NumPy's format, read with ``allow_pickle=False``) inside the snapshot
directory, so it is written atomically with the checkpoint and covered by the snapshot's checksums.
The records were never trained on, so the reconstructions and latent map drawn from them are
honest; at most ``snapshots.sample_records`` of them are kept.
"""

from __future__ import annotations

import io

import numpy as np

from streamvi.errors import CorruptSnapshotError
from streamvi.snapshots.store import SnapshotInfo

SAMPLE_FILE = "heldout_sample.npz"


def encode_sample(x: np.ndarray, c: np.ndarray) -> bytes:
    """The sample file's bytes for rows ``x`` and their contexts ``c`` (zero columns when none)."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, x=np.asarray(x, dtype=np.float32), c=np.asarray(c, dtype=np.float32).reshape(len(x), -1)
    )
    return buffer.getvalue()


def load_sample(info: SnapshotInfo) -> tuple[np.ndarray, np.ndarray] | None:
    """The snapshot's held-out sample (x, c), or None when it keeps none.

    The snapshot has been verified (checksums), so an unreadable file here is a corrupt snapshot.
    """
    path = info.path / SAMPLE_FILE
    if SAMPLE_FILE not in info.meta.get("files", {}) or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            x, c = np.asarray(data["x"], dtype=np.float32), np.asarray(data["c"], dtype=np.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptSnapshotError(f"{info.path}: unreadable {SAMPLE_FILE}: {exc}") from exc
    if x.ndim != 2 or c.ndim != 2 or c.shape[0] != x.shape[0]:
        raise CorruptSnapshotError(f"{info.path}: {SAMPLE_FILE} holds arrays of shapes {x.shape}, {c.shape}")
    return x, c
