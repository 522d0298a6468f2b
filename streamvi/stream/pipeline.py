"""The step pipeline: one step thread and a bounded queue of submitted micro-batches.

The loop's thread fetches, decodes, assembles micro-batches and publishes; one step thread trains.
Between them, up to ``depth`` submitted batches wait for or run in the step (a bounded queue: the
executor's). When it is full, the loop waits for the oldest step and stops fetching, so the
client's own bounded prefetch fills and the broker holds the rest; if the wait outlasts the
keep-alive interval, partitions are paused and the consumer polled so it stays in its group.
Outputs are published in submission order, as each step finishes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from streamvi.anomaly.monitor import Thresholds
from streamvi.io.base import RawRecord, RecordSource
from streamvi.stream.batching import MicroBatcher
from streamvi.training.trainer import StepResult, Trainer

T = TypeVar("T")

#: A held-out evaluation queued behind a step: (step, held-out x, held-out c) -> payload or None.
HeldOutTask = Callable[[int, np.ndarray, np.ndarray], "dict[str, Any] | None"]


class KeepAlive:
    """Waits for work on the step thread while keeping the consumer in its group: past
    ``interval_seconds`` the source is polled with its partitions paused (nothing fetched)."""

    def __init__(self, source: RecordSource, interval_seconds: float | None) -> None:
        self.source = source
        self.interval_seconds = interval_seconds
        #: True while a keep-alive poll may run: a revocation seen then cannot be checkpointed.
        self.busy = False
        #: True inside a rebalance callback, where no poll may be made.
        self.suspended = False

    def wait(self, future: concurrent.futures.Future[T]) -> T:
        interval = self.interval_seconds
        if interval is None or self.suspended:
            return future.result()
        done, _ = concurrent.futures.wait([future], timeout=interval)
        if not done:
            self.busy = True
            try:
                while not done:
                    self.source.keepalive()
                    done, _ = concurrent.futures.wait([future], timeout=interval)
            finally:
                self.busy = False
        return future.result()


@dataclass(frozen=True)
class InFlight:
    """A submitted micro-batch: its buffer, its step on the step thread and, when one is due right
    after that step, the held-out evaluation queued behind it on the same thread."""

    batch: MicroBatcher
    step: concurrent.futures.Future[StepResult]
    heldout: concurrent.futures.Future[dict[str, Any] | None] | None = None
    #: The snapshot whose parameters run the step (an encoder replica's), or None (the live model).
    model: str | None = None
    #: The anomaly thresholds the batch was submitted with (streamvi/anomaly/monitor.py).
    thresholds: Thresholds | None = None


@dataclass(frozen=True)
class Finished:
    """A step that has run, with what its outputs need."""

    records: list[RawRecord]
    record_ids: list[str | None]
    result: StepResult
    heldout: dict[str, Any] | None
    model: str | None = None
    #: Observed dimensions per record (under a feature schema), else None.
    observed: np.ndarray | None = None
    thresholds: Thresholds | None = None
    #: Which real records were never trainable (held out, or outside the training share).
    untrained: np.ndarray | None = None


class StepPipeline:
    """Preallocated batch buffers (one filling, up to ``depth`` submitted) and the step thread."""

    def __init__(
        self,
        trainer: Trainer,
        depth: int,
        max_latency_seconds: float,
        dim: int,
        context_dim: int,
        keepalive: KeepAlive,
        count_observed: bool = False,
    ) -> None:
        if depth < 1:
            raise ValueError("pipeline_depth must be at least 1")
        self.trainer = trainer
        self.depth = depth
        self.keepalive = keepalive
        self.count_observed = count_observed
        self._free = [
            MicroBatcher(trainer.batch_size, dim, max_latency_seconds, context_dim=context_dim)
            for _ in range(depth + 1)
        ]
        self.batcher = self._free.pop()
        self._in_flight: collections.deque[InFlight] = collections.deque()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        #: The step counter once every submitted step has run.
        self.submitted_step = trainer.step
        #: The snapshot ``trainer`` was loaded from, when it is a loaded model that never trains.
        self.model: str | None = None

    def __len__(self) -> int:
        """Submitted batches not yet published."""
        return len(self._in_flight)

    @property
    def full(self) -> bool:
        return len(self._in_flight) >= self.depth

    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """The one worker thread that runs steps and snapshot writes (TensorFlow releases the GIL,
        so decoding and publishing on the loop's thread overlap with it)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamvi-step")
        return self._executor

    def run_guarded(self, operation: Callable[[], T]) -> T:
        """Run ``operation`` on the step thread (after every queued step), keeping the consumer alive;
        inline when there is no keep-alive."""
        if self.keepalive.interval_seconds is None:
            return operation()
        return self.keepalive.wait(self.executor().submit(operation))

    def submit(
        self,
        heldout_every: int | None,
        heldout_task: HeldOutTask,
        held: Callable[[], Any],
        thresholds: Thresholds | None = None,
    ) -> None:
        """Queue the open batch for the step thread and open the next buffer (the caller makes room).

        A held-out evaluation due after this step is queued right behind it on the step thread, so
        it sees exactly the parameters of that step and never overlaps one. Rows whose bound is
        below ``thresholds.train_floor`` are scored but not trained on.
        """
        batch = self.batcher
        n = len(batch)
        executor = self.executor()
        floor = thresholds.train_floor if thresholds is not None else -math.inf
        step = executor.submit(self.trainer.train_rows, batch.padded(), n, floor)
        heldout = None
        if batch.weights[:n].any():  # a step that trains advances the step counter by one
            self.submitted_step += 1
            if heldout_every is not None and self.submitted_step % heldout_every == 0:
                held_x, held_c = (a.copy() for a in held())
                heldout = executor.submit(heldout_task, self.submitted_step, held_x, held_c)
        self._in_flight.append(InFlight(batch, step, heldout, self.model, thresholds))
        self.batcher = self._free.pop()

    def oldest_finished(self) -> bool:
        """True when the oldest submitted step (and its held-out evaluation) has run."""
        if not self._in_flight or not self._in_flight[0].step.done():
            return False
        heldout = self._in_flight[0].heldout
        return heldout is None or heldout.done()

    def pop_oldest(self) -> Finished:
        """Wait for the oldest submitted step (keeping the consumer alive) and free its buffer."""
        entry = self._in_flight.popleft()
        result = self.keepalive.wait(entry.step)
        heldout = self.keepalive.wait(entry.heldout) if entry.heldout is not None else None
        batch = entry.batch
        n = len(batch.records)
        observed = np.count_nonzero(~np.isnan(batch.x[:n]), axis=1) if self.count_observed else None
        finished = Finished(
            batch.records,
            batch.record_ids,
            result,
            heldout,
            entry.model,
            observed,
            entry.thresholds,
            batch.weights[:n] == 0,
        )
        batch.clear()
        self._free.append(batch)
        return finished

    def cancel(self) -> None:
        """Drop every submitted step and the open batch (a rewind): steps not started are cancelled,
        the running one is waited for, and their buffers are freed."""
        while self._in_flight:
            entry = self._in_flight.popleft()
            futures: list[concurrent.futures.Future[Any]] = [entry.step]
            if entry.heldout is not None:
                futures.append(entry.heldout)
            concurrent.futures.wait([f for f in futures if not f.cancel()])
            entry.batch.clear()
            self._free.append(entry.batch)
        self.batcher.clear()

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
