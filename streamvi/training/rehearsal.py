"""The rehearsal window: the most recent trained rows, kept on the model's device.

A stream shows each record once, and one update per micro-batch learns a small stream slowly: the
model is still poor when most of it has gone by, and so are its scores. With
``training.rehearsal_window_records`` set, every step that trains also makes
``training.rehearsal_steps`` further updates, each on a batch drawn uniformly from the last records
it trained on (rehearsal, or experience replay, in continual learning). Only rows that were trained
on enter the window, after their own prequential score: held-out rows and flagged anomalies never
do, and no record is scored by parameters that rehearsed it first.

The window is three variables beside the model (a snapshot holds them, so a restart resumes bit for
bit) and both writing and drawing happen inside the compiled step: no host round-trip.
"""

from __future__ import annotations

import tensorflow as tf


class RehearsalWindow(tf.Module):
    """A ring of the last ``capacity`` trained [x | c | weight] rows, and uniform draws from it."""

    def __init__(self, capacity: int, width: int) -> None:
        super().__init__(name="rehearsal")
        if capacity < 1:
            raise ValueError(f"the rehearsal window must hold at least one row, got {capacity}")
        self.capacity = capacity
        # One row past the ring takes every row that is not kept (one scatter writes a whole batch
        # with a static shape); it is never drawn.
        self.rows = tf.Variable(tf.zeros([capacity + 1, width], tf.float32), trainable=False, name="rows")
        #: Rows held so far, up to ``capacity``.
        self.held = tf.Variable(0, dtype=tf.int64, trainable=False, name="held")
        #: Where the next kept row goes: the oldest row once the ring is full.
        self.next_slot = tf.Variable(0, dtype=tf.int64, trainable=False, name="next_slot")

    def add(self, rows: tf.Tensor, keep: tf.Tensor) -> None:
        """Write the rows of ``rows`` where ``keep`` is true over the oldest held ones, in order.
        At most ``capacity`` rows may be kept at once (the trainer checks its batch size)."""
        kept = tf.cast(keep, tf.int64)
        rank = tf.cumsum(kept, exclusive=True)
        slots = tf.where(keep, (self.next_slot + rank) % self.capacity, tf.constant(self.capacity, tf.int64))
        self.rows.scatter_nd_update(slots[:, None], tf.cast(rows, tf.float32))
        added = tf.reduce_sum(kept)
        self.next_slot.assign((self.next_slot + added) % self.capacity)
        self.held.assign(tf.minimum(self.held + added, self.capacity))

    def draw(self, size: int, seed: tf.Tensor) -> tf.Tensor:
        """``size`` held rows drawn uniformly with replacement (stateless, from ``seed``); only
        meaningful while some row is held."""
        index = tf.random.stateless_uniform(
            [size], seed, minval=0, maxval=tf.maximum(self.held, 1), dtype=tf.int64
        )
        return tf.gather(self.rows, index)
