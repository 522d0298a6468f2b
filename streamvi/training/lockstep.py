"""Lockstep: when N trainer workers close their micro-batches, decided on all-reduced counts.

Every step is collective (streamvi/training/distributed.py), so every worker must take part in the
same steps, in the same order, whatever its partitions hold. A worker cannot close its batch on its
own rule (full, or past ``training.max_batch_latency_ms``): it would enter the all-reduce while the
others wait on their input, or never. So once per turn of its loop each worker brings its
:class:`Round` to one tiny all-reduce, and every worker reads the same :class:`Agreement`:

- **close** when any worker's batch is full or any worker's oldest record has waited its latency
  bound (the single-process rule, evaluated on the union): then every worker submits its open
  batch to the step, an idle worker (no partition, or nothing new) with 0 records and weight 0;
- **stop** when any worker is stopping (SIGTERM, its record budget), or when every worker has been
  idle for its idle timeout (one idle worker beside busy ones is not an idle stream): every worker
  closes what it holds, takes the final step and checkpoint together, and stops;
- **checkpoint** when any worker's checkpoint is due (its step or time rule): every worker closes
  its batch, then all checkpoint together after that step;
- **rewind** when any worker lost partitions in a rebalance (or failed to deliver its outputs):
  every worker goes back to the last trusted snapshot at once and resumes the partitions it now
  holds at that snapshot's offsets, so no record is trained twice and the parameters stay equal;
- **drift** when any worker's drift detector found a drift in its reference scores: every worker
  counts and reports it and runs the drift response (reset the optimizer, raise the learning rate)
  before the round's step, so the optimizer stays equal everywhere; the workers that did not find
  it restart their reference and detector as the finder did;
- **idle** when no worker holds a record: nothing closes, and the next round waits up to the
  latency bound in its poll before it comes (the poll's own timeout paces the rounds), so an idle
  topic costs a few small collectives a second, not a spinning CPU.

The collectives of a worker (rounds and steps) must be issued in the same order on every worker:
both go through one thread (the step thread) in the order the loop submits them.

Snapshots: a checkpoint is due on an agreed round (the step and time rules on reduced values), so
every worker checkpoints after the same step; each worker's next offsets are gathered to every
worker (:func:`gather_offsets`), the chief writes the one snapshot holding the model and all of
them, and each worker commits its own partitions' offsets once it is durable. A restarted group
restores that snapshot everywhere and each worker seeks the partitions it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import tensorflow as tf

from streamvi.io.base import Partition


class AllReduce(Protocol):
    def all_reduce(self, values: list[tf.Tensor]) -> list[tf.Tensor]: ...


class GatherInts(Protocol):
    def gather_ints(self, values: list[int]) -> list[list[int]]: ...


@dataclass(frozen=True)
class Round:
    """What one worker brings to a round: its open batch's records and whether it would close."""

    rows: int
    full: bool = False
    due: bool = False
    stopping: bool = False
    checkpoint: bool = False
    rewind: bool = False
    #: Idle past its idle timeout: the workers stop once every one of them is.
    idle: bool = False
    #: Its drift detector found a drift: every worker answers it at this round.
    drift: bool = False

    def vector(self) -> list[float]:
        flags = (self.full, self.due, self.stopping, self.checkpoint, self.rewind, self.idle, self.drift)
        return [float(self.rows), *(float(flag) for flag in flags), 1.0]


@dataclass(frozen=True)
class Agreement:
    """What every worker does after a round (the same on all of them)."""

    #: Every worker submits its open batch (possibly empty) to the next step.
    close: bool
    #: Records in all workers' open batches.
    rows: int
    #: Some worker is stopping: close what there is, take the final checkpoint, stop.
    stop: bool
    #: Some worker's checkpoint is due: every worker checkpoints after this round's step.
    checkpoint: bool = False
    #: Some worker must go back to the last snapshot: every worker rewinds (before anything else).
    rewind: bool = False
    #: Some worker's detector found a drift: every worker runs the drift response before the step.
    drift: bool = False

    @property
    def idle(self) -> bool:
        """No worker holds a record: wait up to the latency bound before the next round."""
        return self.rows == 0

    @classmethod
    def of_sums(cls, sums: list[float]) -> Agreement:
        """The agreement from the all-reduced (summed) :meth:`Round.vector` of every worker."""
        rows, full, due, stopping, checkpoint, rewind, idle, drift, workers = (round(value) for value in sums)
        stop = stopping > 0 or idle == workers
        if rewind > 0:  # what is open belongs to the interval the rewind abandons (its drift too)
            return cls(close=False, rows=rows, stop=stop, rewind=True)
        checkpoint_due = checkpoint > 0
        close = rows > 0 and (full > 0 or due > 0 or stop or checkpoint_due)
        return cls(close=close, rows=rows, stop=stop, checkpoint=checkpoint_due, drift=drift > 0)


def agree(cluster: AllReduce, mine: Round) -> Agreement:
    """One lockstep round: all-reduce every worker's :class:`Round`; blocks until all have come
    (or ``distribution.collective_timeout_seconds`` passes, when the collective fails)."""
    (sums,) = cluster.all_reduce([tf.constant(mine.vector(), tf.float64)])
    return Agreement.of_sums([float(value) for value in sums.numpy()])


def all_agree(cluster: AllReduce, ok: bool) -> bool:
    """Whether every worker says ``ok`` (one all-reduce): a stage of a collective checkpoint goes on
    only when it succeeded everywhere, so every worker takes the same branch."""
    (failures,) = cluster.all_reduce([tf.constant([0.0 if ok else 1.0], tf.float64)])
    return float(failures.numpy()[0]) == 0.0


def gather_offsets(cluster: GatherInts, topic: str, offsets: Mapping[Partition, int]) -> dict[Partition, int]:
    """Every worker's next offsets of ``topic``, merged: what the chief's snapshot records.

    A partition is one worker's at a time (one consumer group); one claimed by two workers with
    different offsets (a rebalance not yet settled) is an error rather than a silent choice.
    """
    foreign = sorted({t for t, _ in offsets if t != topic})
    if foreign:
        raise ValueError(f"offsets of {foreign}: the trainers consume only {topic!r}")
    flat = [value for (_, number), offset in sorted(offsets.items()) for value in (number, offset)]
    merged: dict[Partition, int] = {}
    for worker, values in enumerate(cluster.gather_ints(flat)):
        for number, offset in zip(values[::2], values[1::2], strict=True):
            partition = (topic, int(number))
            if merged.get(partition, offset) != offset:
                raise ValueError(f"partition {partition} is claimed by worker {worker} and another")
            merged[partition] = int(offset)
    return merged
