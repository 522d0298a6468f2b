"""Micro-batch assembly into preallocated arrays, closed by size or by the latency bound."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from streamvi.io.base import RawRecord


class MicroBatcher:
    """Gathers decoded rows until ``batch_size`` records or ``max_latency_seconds`` after the first one.

    Besides x and the context c, each row has a training weight: 1 to train on it, 0 to only score
    it (a held-out record); padding rows past the real ones always weigh 0. All three live in one
    array ``rows`` = [x | c | weight], so a batch goes to the device in one transfer.
    """

    def __init__(self, batch_size: int, dim: int, max_latency_seconds: float, context_dim: int = 0) -> None:
        self.batch_size = batch_size
        self.max_latency_seconds = max_latency_seconds
        self.rows = np.zeros((batch_size, dim + context_dim + 1), dtype=np.float32)
        self.x = self.rows[:, :dim]
        self.c = self.rows[:, dim : dim + context_dim]
        self.weights = self.rows[:, dim + context_dim]
        self.records: list[RawRecord] = []
        self.record_ids: list[str | None] = []
        self.opened_at: float | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def full(self) -> bool:
        return len(self.records) >= self.batch_size

    @property
    def room(self) -> int:
        """Rows still free in the open batch."""
        return self.batch_size - len(self.records)

    def add_rows(
        self,
        records: Sequence[RawRecord],
        x: np.ndarray,
        record_ids: Sequence[str | None],
        c: np.ndarray,
        train: np.ndarray,
        now: float | None = None,
    ) -> None:
        """Place a block of rows with one array copy each (x, c, weights); at most ``room`` rows."""
        count = len(records)
        if count == 0:
            return
        if count > self.room:
            raise RuntimeError(f"micro-batch has room for {self.room} rows, not {count}")
        index = len(self.records)
        if index == 0:
            self.opened_at = time.monotonic() if now is None else now
        self.x[index : index + count] = x
        if c.size:
            self.c[index : index + count] = c
        self.weights[index : index + count] = train
        self.records.extend(records)
        self.record_ids.extend(record_ids)

    def time_left(self, now: float | None = None) -> float | None:
        """Seconds until the open batch must close; None when it is empty."""
        if self.opened_at is None:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, self.opened_at + self.max_latency_seconds - now)

    def due(self, now: float | None = None) -> bool:
        left = self.time_left(now)
        return self.full or (left is not None and left <= 0.0)

    def padded(self) -> np.ndarray:
        """The [x | c | weight] rows with those past the real records zeroed (masked out of the loss)."""
        self.rows[len(self.records) :] = 0.0
        return self.rows

    def clear(self) -> None:
        self.records = []
        self.record_ids = []
        self.opened_at = None
