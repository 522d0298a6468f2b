"""Output progress: which records' outputs were sent before, and what to do with them now.

At-least-once: outputs of the records after the last snapshot are published again after a restart
or a rewind. How far outputs had gone is written beside the snapshots (not fsynced: it only has to
survive a process crash), so those re-published records can be counted
(``streamvi_replayed_records_total``).

Exactly-once: a restored snapshot can be behind the group's committed offsets on some partitions
(trainer workers whose transactions committed when another's did not, or a newer snapshot lost).
The outputs of those records are already visible; they are trained on again, so the model has
learnt from every record once, but their outputs are withheld (``streamvi_outputs_withheld_total``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from streamvi.io.base import Partition, RawRecord
from streamvi.snapshots.store import SnapshotStore

log = logging.getLogger(__name__)


class OutputProgress:
    """Per partition, the offset up to which outputs are on their way, and the replay window."""

    def __init__(
        self, store: SnapshotStore | None, on_replayed: Callable[[int], None] = lambda count: None
    ) -> None:
        """``store=None`` keeps the progress in memory only (an encoder replica: it has no snapshot
        directory of its own), so only replays after a rewind are counted, not after a restart."""
        self.store = store
        self.sent: dict[Partition, int] = {}
        self.replay_until: dict[Partition, int] = {}
        self._on_replayed = on_replayed
        #: Exactly-once: per partition, the offset below which outputs are already visible.
        self.visible_until: dict[Partition, int] = {}

    def mark_sent(self, records: Sequence[RawRecord]) -> None:
        """The outputs of ``records`` are on their way (may be published)."""
        sent = self.sent
        # Records are in offset order per partition, so the last one of each partition is its furthest.
        for partition, end in {(r.topic, r.partition): r.offset + 1 for r in records}.items():
            if end > sent.get(partition, 0):
                sent[partition] = end

    def persist(self) -> None:
        if self.store is not None:
            self.store.write_progress(self.sent)

    def resume(self, sent: Mapping[Partition, int], start: Mapping[Partition, int]) -> None:
        """At start-up: what was ``sent`` before the crash (as ``store.read_progress`` found it),
        past ``start``, will be output again."""
        self.sent = dict(sent)
        self.rewind_to(start)
        if self.replay_until:
            total = sum(o - start.get(p, 0) for p, o in self.replay_until.items())
            log.warning("up to %d records after the last snapshot will be output again", total)

    def rewind_to(self, start: Mapping[Partition, int]) -> None:
        """Consumption goes back to ``start``: records up to what was sent are replays."""
        self.replay_until = {p: o for p, o in self.sent.items() if o > start.get(p, 0)}

    def note_replays(self, records: Sequence[RawRecord]) -> None:
        """Count the records of a fetch whose outputs were already sent once."""
        if not self.replay_until:
            return
        replayed = 0
        for record in records:
            until = self.replay_until.get((record.topic, record.partition))
            if until is not None and record.offset < until:
                replayed += 1
        for (topic, partition), until in list(self.replay_until.items()):
            if any(r.topic == topic and r.partition == partition and r.offset >= until - 1 for r in records):
                del self.replay_until[(topic, partition)]
        if replayed:
            self._on_replayed(replayed)

    # -- exactly-once ------------------------------------------------------------------------------
    def outputs_visible(self, start: Mapping[Partition, int], committed: Mapping[Partition, int]) -> int:
        """Consumption restarts at ``start`` while a transaction already committed outputs and
        offsets up to ``committed``: the records in between are to be trained on without sending
        their outputs again. Returns how many records that is."""
        self.visible_until = {p: o for p, o in committed.items() if p in start and o > start[p]}
        total = sum(o - start[p] for p, o in self.visible_until.items())
        if total:
            log.warning(
                "%d records after the restored snapshot already have their outputs published (%s): "
                "they are trained on again, their outputs not sent again",
                total,
                {f"{t}:{n}": (start[(t, n)], o) for (t, n), o in sorted(self.visible_until.items())},
            )
        return total

    def to_send(self, records: Sequence[RawRecord]) -> np.ndarray | None:
        """Which of ``records`` get their outputs sent: None when all do (the common case, no work),
        else a boolean mask."""
        visible = self.visible_until
        if not visible:
            return None
        send = np.fromiter(
            (r.offset >= visible.get((r.topic, r.partition), 0) for r in records),
            dtype=bool,
            count=len(records),
        )
        return None if send.all() else send

    def committed_through(self, offsets: Mapping[Partition, int]) -> None:
        """A transaction committed up to ``offsets``: every record of a window below them has been
        handled, and the window closes (windows close only here, as outputs of a partition's
        records are sent out of offset order: a dead letter before the batch of earlier records)."""
        for partition, until in list(self.visible_until.items()):
            if offsets.get(partition, 0) >= until:
                del self.visible_until[partition]
