"""The held-out reservoir: a stable, hash-selected share of the stream that is scored but never trained on."""

from __future__ import annotations

import zlib

import numpy as np

from streamvi.io.base import RawRecord
from streamvi.training.sampling import record_identity


class HeldOutReservoir:
    """Selects records by a hash of their key (or origin, for keyless records) and keeps the newest.

    The choice depends only on the key, so a record is held out in every run and after every
    restart; the reservoir keeps the ``capacity`` most recent held-out records (it follows drift).
    """

    def __init__(self, fraction: float, capacity: int, dim: int, context_dim: int = 0) -> None:
        self.fraction = fraction
        self.capacity = capacity
        self._threshold = int(fraction * 2**32)
        self.x = np.zeros((capacity, dim), dtype=np.float32)
        self.c = np.zeros((capacity, context_dim), dtype=np.float32)
        self._next = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def selects(self, record: RawRecord) -> bool:
        """True when ``record`` belongs to the held-out share."""
        if self._threshold == 0:
            return False
        return zlib.crc32(record_identity(record)) < self._threshold

    def add(self, x: np.ndarray, c: np.ndarray) -> None:
        self.x[self._next] = x
        if c.size:
            self.c[self._next] = c
        self._next = (self._next + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)

    def newest(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the newest ``count`` held-out rows kept (x, c), oldest first."""
        x, c = self.contents()
        start = max(0, len(x) - count)
        return x[start:].copy(), c[start:].copy()

    def contents(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out rows currently kept (x, c), oldest first once the ring has wrapped."""
        if self._size < self.capacity:
            return self.x[: self._size], self.c[: self._size]
        order = np.r_[self._next : self.capacity, 0 : self._next]
        return self.x[order], self.c[order]
