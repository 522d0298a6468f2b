"""Ingest: a fetch decoded at once, split into trained and held-out rows, bad records set aside.

A record counts as consumed once it is in a micro-batch or on its way to the dead-letter topic;
blocks of a fetch go out in offset order, each as many records as fill the open batch with valid
rows, so a checkpoint (which drains the batches first) never moves an offset ahead of training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from streamvi.io.base import RawRecord
from streamvi.io.codecs import BatchDecoder, DecodedBatch, DecodeError
from streamvi.stream.state import EvaluationPolicy


@dataclass(frozen=True)
class Fetch:
    """A decoded fetch and, per record, whether it is trained on (1) or only scored (0, held out)."""

    records: list[RawRecord]
    decoded: DecodedBatch
    train: np.ndarray


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

    def __init__(self, decoder: BatchDecoder, evaluation: EvaluationPolicy | None) -> None:
        self.decoder = decoder
        self.evaluation = evaluation

    def decode(self, records: list[RawRecord]) -> Fetch:
        """Decode a whole fetch; held-out records join the reservoir and are marked not to train."""
        decoded = self.decoder.decode_many(records)
        train = np.ones(len(records), dtype=np.float32)
        if self.evaluation is not None:
            reservoir = self.evaluation.reservoir
            errors = decoded.errors
            for i, record in enumerate(records):
                if errors[i] is None and reservoir.selects(record):
                    train[i] = 0.0
                    reservoir.add(decoded.x[i], decoded.c[i])
        return Fetch(records, decoded, train)

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
        errors = decoded.errors
        start, n = 0, len(records)
        while start < n:
            if stale():
                return
            space = room()
            good: Sequence[int]
            if decoded.all_valid:
                end = min(n, start + space)
                good = range(start, end)
            else:
                good_list: list[int] = []
                end = start
                while end < n and len(good_list) < space:
                    error = errors[end]
                    if error is None:
                        good_list.append(end)
                    else:
                        dead_letter(records[end], error)
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
