"""Ingest: a fetch decoded at once, split into trained and only-scored rows, bad records set aside.

A record counts as consumed once it is in a micro-batch, on its way to the dead-letter topic, or
left out on purpose (outside the trainer's share when it publishes no latents); blocks of a fetch
go out in offset order, each as many records as fill the open batch with valid rows, so a
checkpoint (which drains the batches first) never moves an offset ahead of training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from streamvi.io.base import RawRecord
from streamvi.io.codecs import BatchDecoder, DecodedBatch, DecodeError
from streamvi.stream.state import EvaluationPolicy
from streamvi.training.sampling import TrainingSample


class TrainingShare:
    """Which records a role trains on and which it scores.

    ``fraction`` of the records, chosen by a hash of the record key (of topic/partition/offset
    without a key: see :func:`streamvi.training.sampling.record_identity`), are trained on; the
    rest are only scored, or left out altogether when ``score_all`` is False (a trainer that
    publishes no latents has no use for their scores). ``fraction=0`` with ``score_all``: score
    every record and train on none (an encoder replica).
    """

    def __init__(self, fraction: float = 1.0, score_all: bool = True) -> None:
        self.fraction = fraction
        self.score_all = score_all
        self._sample = TrainingSample(fraction)

    def trains(self, record: RawRecord) -> bool:
        return self._sample.selects(record)


@dataclass(frozen=True)
class Fetch:
    """A decoded fetch and, per record, whether it is trained on (1) or only scored (0, held out or
    outside the training share), and whether it goes into a batch at all (``keep``; None: all)."""

    records: list[RawRecord]
    decoded: DecodedBatch
    train: np.ndarray
    keep: np.ndarray | None = None
    #: Valid records outside the training share (not trained on).
    outside_share: int = 0


@dataclass(frozen=True)
class Block:
    """The next consecutive records of a fetch: ``consumed`` moves the offsets, the valid ones among
    them (``rows`` of the fetch's arrays, ``records``, ``record_ids``) go into the open batch."""

    consumed: Sequence[RawRecord]
    rows: slice | list[int]
    records: list[RawRecord]
    record_ids: list[str | None]


class Ingest:
    """Decodes fetches and cuts them into blocks that fit the open micro-batch."""

    def __init__(
        self,
        decoder: BatchDecoder,
        evaluation: EvaluationPolicy | None,
        share: TrainingShare | None = None,
    ) -> None:
        self.decoder = decoder
        self.evaluation = evaluation
        self.share = share or TrainingShare()

    def decode(self, records: list[RawRecord]) -> Fetch:
        """Decode a whole fetch; held-out records join the reservoir and are marked not to train,
        records outside the training share are marked not to train (or left out)."""
        decoded = self.decoder.decode_many(records)
        n = len(records)
        share = self.share
        if share.fraction == 0.0:
            return Fetch(records, decoded, np.zeros(n, dtype=np.float32))
        train = np.ones(n, dtype=np.float32)
        errors = decoded.errors
        outside = 0
        if share.fraction < 1.0:
            for i, record in enumerate(records):
                if errors[i] is None and not share.trains(record):
                    train[i] = 0.0
                    outside += 1
        if self.evaluation is not None:
            reservoir = self.evaluation.reservoir
            for i, record in enumerate(records):
                if errors[i] is None and reservoir.selects(record):
                    if not train[i]:
                        outside -= 1  # held out: not the share's to train on in any case
                    train[i] = 0.0
                    reservoir.add(decoded.x[i], decoded.c[i])
        keep = None if share.score_all else train > 0
        return Fetch(records, decoded, train, keep, outside)

    def blocks(
        self,
        fetch: Fetch,
        room: Callable[[], int],
        dead_letter: Callable[[RawRecord, DecodeError], None],
        stale: Callable[[], bool],
    ) -> Iterator[Block]:
        """Blocks of the fetch in offset order, each filling at most ``room()`` rows of the open
        batch; a bad record is handed to ``dead_letter`` in its place. Stops when ``stale()``
        (a rewind: the rest of the fetch will be fetched again)."""
        records, decoded = fetch.records, fetch.decoded
        errors, keep = decoded.errors, fetch.keep
        start, n = 0, len(records)
        while start < n:
            if stale():
                return
            space = room()
            good: Sequence[int]
            if decoded.all_valid and keep is None:
                end = min(n, start + space)
                good = range(start, end)
            else:
                good_list: list[int] = []
                end = start
                while end < n and len(good_list) < space:
                    error = errors[end]
                    if error is not None:
                        dead_letter(records[end], error)
                    elif keep is None or keep[end]:
                        good_list.append(end)
                    end += 1
                good = good_list
            if len(good) == end - start:
                yield Block(
                    records[start:end], slice(start, end), records[start:end], decoded.record_ids[start:end]
                )
            else:
                yield Block(
                    records[start:end],
                    list(good),
                    [records[i] for i in good],
                    [decoded.record_ids[i] for i in good],
                )
            start = end


def appended_at(record: RawRecord, max_latency_seconds: float) -> float:
    """When ``record`` was appended, on the monotonic clock: a batch's latency bound counts from
    its first record's append, so time spent reaching the daemon is inside the bound. The age
    from the record's timestamp is clamped to [0, bound]: a skewed clock or an old record can
    only make a batch close sooner, never later than the bound after it arrived."""
    now = time.monotonic()
    if record.timestamp_ms < 0:
        return now
    age = time.time() - record.timestamp_ms / 1000.0
    return now - min(max(age, 0.0), max_latency_seconds)
