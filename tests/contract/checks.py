"""The contract of :mod:`streamvi.io.base`, one function per property, run against every
implementation: the in-memory test doubles in tests/unit/test_io_contract.py, the kafka-python and
librdkafka adapters on the embedded broker in tests/integration/test_io_contract.py. A property
the doubles break is a place where unit tests would pass against something Kafka never does.

A check gets a *world*: a topic, a consumer group and whatever the implementation needs to create
sources or sinks on them and to see what a consumer of the output topic would see.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import pytest

from streamvi.errors import OutputError, StreamVIError
from streamvi.io.base import OutputMessage, OutputSink, Partition, RawRecord, RecordSource

#: (key, value, headers): what a consumer of an output topic reads back.
Seen = tuple[bytes | None, bytes, list[tuple[str, bytes]]]

#: How long a check waits for the broker (group join, fetches) before it fails.
PATIENCE_SECONDS = 30.0


class SourceWorld(Protocol):
    """An input topic of ``partitions`` partitions and a consumer group."""

    topic: str
    partitions: int
    #: A second member of the group takes partitions from the first (false for a single consumer).
    can_rebalance: bool

    def produce(self, per_partition: int) -> dict[Partition, list[RawRecord]]:
        """Write ``per_partition`` records (key, value, headers) to every partition; what was written."""

    def source(self) -> RecordSource:
        """A new member of the group subscribed to the topic, nothing assigned yet."""


class SinkWorld(Protocol):
    """An output topic, and an input partition whose offsets a transaction commits for the group."""

    topic: str
    partition: Partition

    def sink(self, transactional: bool) -> OutputSink: ...

    def group_metadata(self) -> object:
        """What ``commit_transaction`` is given to commit offsets for the group."""

    def visible(self, expected: int) -> list[Seen]:
        """What a read_committed consumer of the topic sees (waiting for ``expected`` messages)."""

    def committed(self) -> dict[Partition, int]:
        """The group's committed offsets."""

    def undeliverable(self) -> OutputMessage | None:
        """A message the sink accepts but cannot deliver (None: the implementation has none)."""


# -- helpers ---------------------------------------------------------------------------------------
@dataclass
class Hooks:
    """Records the rebalance callbacks a source makes. A revocation of no partition is no event
    (kafka-python reports one before a member's first join, librdkafka none)."""

    events: list[tuple[str, list[Partition]]]
    #: ``assignment()`` as the source reported it from inside each ``on_assigned``.
    seen_in_assigned: list[list[Partition]]
    threads: set[int]

    @classmethod
    def on(cls, source: RecordSource) -> Hooks:
        hooks = cls([], [], set())

        def assigned(partitions: Sequence[Partition]) -> None:
            hooks.events.append(("assigned", sorted(partitions)))
            hooks.seen_in_assigned.append(source.assignment())
            hooks.threads.add(threading.get_ident())

        def revoked(partitions: Sequence[Partition]) -> None:
            hooks.threads.add(threading.get_ident())
            if partitions:
                hooks.events.append(("revoked", sorted(partitions)))

        source.set_rebalance_callbacks(assigned, revoked)
        return hooks


@contextlib.contextmanager
def new_member(world: SourceWorld) -> Iterator[RecordSource]:
    """A new member of the world's group, closed after."""
    source = world.source()
    try:
        yield source
    finally:
        source.close()


def take(source: RecordSource, count: int, max_records: int = 1000) -> list[RawRecord]:
    """The next ``count`` records (fewer if they do not come in time); each poll within ``max_records``."""
    got: list[RawRecord] = []
    deadline = time.monotonic() + PATIENCE_SECONDS
    while len(got) < count and time.monotonic() < deadline:
        batch = source.poll(0.5, min(max_records, count - len(got)))
        assert len(batch) <= max_records
        got += batch
    return got


def positions(records: Sequence[RawRecord]) -> dict[Partition, list[int]]:
    """The offsets taken from each partition, in the order they came."""
    taken: dict[Partition, list[int]] = {}
    for record in records:
        taken.setdefault((record.topic, record.partition), []).append(record.offset)
    return taken


def contents(records: Sequence[RawRecord]) -> dict[tuple[str, int, int], tuple[object, ...]]:
    """Each record's (key, value, headers) by (topic, partition, offset)."""
    return {(r.topic, r.partition, r.offset): (r.key, r.value, list(r.headers)) for r in records}


def first_offsets(records: Sequence[RawRecord]) -> dict[Partition, int]:
    return {partition: offsets[0] for partition, offsets in positions(records).items()}


def _partition(world: SourceWorld, number: int) -> Partition:
    return (world.topic, number)


# -- record sources --------------------------------------------------------------------------------
def check_rebalance_hooks_fire_on_assignment(world: SourceWorld) -> None:
    """``on_assigned`` runs with the new partitions before any of their records is returned, and
    ``assignment()`` already lists them; nothing is revoked."""
    world.produce(5)
    with new_member(world) as source:
        hooks = Hooks.on(source)
        records: list[RawRecord] = []
        deadline = time.monotonic() + PATIENCE_SECONDS
        while len(records) < 5 * world.partitions and time.monotonic() < deadline:
            batch = source.poll(0.5, 100)
            assert hooks.events or not batch, "records returned before their partition was assigned"
            records += batch
        every = [_partition(world, n) for n in range(world.partitions)]
        assert hooks.events == [("assigned", every)]
        assert hooks.seen_in_assigned == [every]
        assert source.assignment() == every


def check_rebalance_hooks_run_on_the_polling_thread(world: SourceWorld) -> None:
    """The hooks run inside ``poll``, on the thread that polls (so they may use the source)."""
    world.produce(2)
    with new_member(world) as source:
        hooks = Hooks.on(source)
        take(source, 2 * world.partitions)
        assert hooks.events and hooks.threads == {threading.get_ident()}


def check_poll_returns_each_partitions_records_in_offset_order(world: SourceWorld) -> None:
    """Every record once, each partition's in offset order from its start, as written (key, value,
    headers, topic), at most ``max_records`` per poll."""
    written = world.produce(20)
    with new_member(world) as source:
        records = take(source, 20 * world.partitions, max_records=7)
        assert positions(records) == {p: list(range(20)) for p in written}
        assert contents(records) == contents([r for rs in written.values() for r in rs])
        assert source.poll(0.5, 10) == []


def check_poll_waits_at_most_its_timeout(world: SourceWorld) -> None:
    """With nothing to return, ``poll`` gives up after about ``timeout_seconds``."""
    world.produce(2)
    with new_member(world) as source:
        assert len(take(source, 2 * world.partitions)) == 2 * world.partitions
        started = time.monotonic()
        assert source.poll(0.5, 10) == []
        assert time.monotonic() - started < 0.5 + 1.5


def check_start_offsets_apply_on_assignment(world: SourceWorld) -> None:
    """A partition with a start offset resumes there; one without, at the group's committed offset
    (here none: its beginning)."""
    world.produce(10)
    with new_member(world) as source:
        source.set_start_offsets({_partition(world, 0): 6})
        records = take(source, 4 + 10 * (world.partitions - 1))
        taken = positions(records)
        assert taken[_partition(world, 0)] == [6, 7, 8, 9]
        for number in range(1, world.partitions):
            assert taken[_partition(world, number)] == list(range(10))


def check_commit_round_trips_through_committed_offsets(world: SourceWorld) -> None:
    """What ``commit`` stores, ``committed_offsets`` returns; a partition without a commit is left
    out, and committing nothing changes nothing."""
    world.produce(10)
    first, second = _partition(world, 0), _partition(world, 1)
    with new_member(world) as source:
        take(source, 10 * world.partitions)
        assert source.committed_offsets([first, second]) == {}
        source.commit({first: 3})
        assert source.committed_offsets([first, second]) == {first: 3}
        source.commit({})
        assert source.committed_offsets([first, second]) == {first: 3}
        source.commit({first: 7, second: 2})
        assert source.committed_offsets([first, second]) == {first: 7, second: 2}
        assert source.committed_offsets([]) == {}


def check_seek_rewinds_listed_partitions_and_the_rest_to_the_committed_offset(world: SourceWorld) -> None:
    """``seek`` moves every listed partition to its offset, and every other assigned one to the
    group's committed offset, or its beginning without one."""
    world.produce(10)
    first, second = _partition(world, 0), _partition(world, 1)
    with new_member(world) as source:
        take(source, 10 * world.partitions)
        source.commit({second: 4})
        source.seek({first: 2})
        assert first_offsets(take(source, 8 + 6)) == {first: 2, second: 4}
        source.seek({})
        assert first_offsets(take(source, 10 + 6)) == {first: 0, second: 4}
        assert source.poll(0.5, 10) == []


def check_a_new_member_resumes_at_the_committed_offsets(world: SourceWorld) -> None:
    """Offsets committed by one member are where the next member of the group starts."""
    world.produce(10)
    first, second = _partition(world, 0), _partition(world, 1)
    with new_member(world) as source:
        take(source, 10 * world.partitions)
        source.commit({first: 5, second: 8})
    with new_member(world) as again:
        assert first_offsets(take(again, 5 + 2)) == {first: 5, second: 8}


def check_keepalive_takes_no_record(world: SourceWorld) -> None:
    """``keepalive`` (during a long step) returns and skips no record: polling afterwards goes on
    where the last poll stopped."""
    world.produce(12)
    with new_member(world) as source:
        records = take(source, 3)
        every = source.assignment()
        for _ in range(3):
            source.keepalive()
        records += take(source, 12 * world.partitions - 3)
        assert positions(records) == {p: list(range(12)) for p in every}
        assert source.poll(0.5, 10) == []


def check_highwater_is_the_next_offset_to_be_written(world: SourceWorld) -> None:
    """Once a partition's records were fetched, ``highwater`` is its next offset to be written."""
    world.produce(9)
    with new_member(world) as source:
        take(source, 9 * world.partitions)
        assert {p: source.highwater(p) for p in source.assignment()} == {
            _partition(world, n): 9 for n in range(world.partitions)
        }


def check_an_assigned_member_is_connected_and_has_group_metadata(world: SourceWorld) -> None:
    world.produce(3)
    with new_member(world) as source:
        take(source, 3 * world.partitions)
        assert source.connected()
        assert source.group_metadata() is not None


def check_close_is_idempotent(world: SourceWorld) -> None:
    world.produce(2)
    source = world.source()
    take(source, 2)
    source.close()
    source.close()


@dataclass
class Rebalance:
    """What a rebalance did: the partitions the first member had, each member's hooks, its share
    and the first offset read from each partition of its share afterwards."""

    every: list[Partition]
    hooks: dict[str, Hooks]
    share: dict[str, list[Partition]]
    resumed: dict[str, dict[Partition, int]]


def rebalance_with_a_joining_member(
    world: SourceWorld,
    before_join: Callable[[RecordSource], None],
    on_revoked: Callable[[RecordSource, Sequence[Partition]], None],
) -> Rebalance:
    """A first member takes records, ``before_join(first)``, then a second member joins and both
    poll until each has its share, and a little longer. ``on_revoked(first, partitions)`` runs in
    the first member's revocation hook."""
    world.produce(20)
    first, second = world.source(), None
    hooks = {"first": Hooks.on(first)}
    try:
        take(first, 4)
        every = first.assignment()
        record = hooks["first"].events.append

        def revoked(partitions: Sequence[Partition]) -> None:
            if partitions:
                record(("revoked", sorted(partitions)))
            on_revoked(first, partitions)

        first.set_rebalance_callbacks(lambda partitions: record(("assigned", sorted(partitions))), revoked)
        before_join(first)
        second = world.source()
        hooks["second"] = Hooks.on(second)
        members = {"first": first, "second": second}

        def rebalanced(name: str) -> bool:
            events = hooks[name].events
            return len(events) > (2 if name == "first" else 0) and events[-1][0] == "assigned"

        after: dict[str, list[RawRecord]] = {"first": [], "second": []}  # since the latest assignment
        deadline = time.monotonic() + PATIENCE_SECONDS
        while not all(rebalanced(name) for name in members):
            assert time.monotonic() < deadline, f"no rebalance: {hooks['first']}, {hooks['second']}"
            for name, member in members.items():
                before = len(hooks[name].events)
                batch = member.poll(0.5, 100)
                if len(hooks[name].events) != before:
                    after[name] = []
                if rebalanced(name):
                    after[name] += batch
        settle = time.monotonic() + 2.0
        while time.monotonic() < settle:
            for name, member in members.items():
                after[name] += member.poll(0.2, 100)
        return Rebalance(
            every,
            hooks,
            {name: hooks[name].events[-1][1] for name in members},
            {name: first_offsets(after[name]) for name in members},
        )
    finally:
        for member in (second, first):
            if member is not None:
                member.set_rebalance_callbacks(lambda p: None, lambda p: None)
                member.close()


def _commit_before_join(committed: dict[Partition, int]) -> Callable[[RecordSource], None]:
    def commit(first: RecordSource) -> None:
        committed.update({p: 10 + p[1] for p in first.assignment()})
        first.commit(committed)

    return commit


def check_a_joining_member_takes_partitions_after_a_revocation(world: SourceWorld) -> None:
    """Rebalances are eager: when a second member joins, every partition of the first is revoked,
    then each member is assigned its share; the new owner of a partition starts at the group's
    committed offset."""
    if not world.can_rebalance:
        pytest.skip("a single consumer: nothing to rebalance")
    committed: dict[Partition, int] = {}
    done = rebalance_with_a_joining_member(world, _commit_before_join(committed), lambda f, p: None)
    assert done.hooks["first"].events[:2] == [("assigned", done.every), ("revoked", done.every)]
    assert all(done.share.values()) and sorted(done.share["first"] + done.share["second"]) == done.every
    assert done.resumed["second"] == {p: committed[p] for p in done.share["second"]}


def check_a_partition_kept_through_a_rebalance_resumes_at_the_committed_offset(world: SourceWorld) -> None:
    """A partition revoked and assigned again to the same member starts over at the group's
    committed offset, not where that member had read to."""
    if not world.can_rebalance:
        pytest.skip("a single consumer: nothing to rebalance")
    committed: dict[Partition, int] = {}
    done = rebalance_with_a_joining_member(world, _commit_before_join(committed), lambda f, p: None)
    assert done.resumed["first"] == {p: committed[p] for p in done.share["first"]}


def check_a_revocation_hook_may_commit(world: SourceWorld) -> None:
    """The loop may checkpoint inside ``on_revoked``: what it commits there is where the partitions
    resume, on whichever member gets them."""
    if not world.can_rebalance:
        pytest.skip("a single consumer: nothing to rebalance")
    committed: dict[Partition, int] = {}

    def commit(first: RecordSource, partitions: Sequence[Partition]) -> None:
        offsets = {p: 12 + p[1] for p in partitions}
        first.commit(offsets)
        committed.update(offsets)

    done = rebalance_with_a_joining_member(world, lambda first: None, commit)
    assert sorted(committed) == done.every
    assert {**done.resumed["first"], **done.resumed["second"]} == committed


SOURCE_CHECKS = [
    check_rebalance_hooks_fire_on_assignment,
    check_rebalance_hooks_run_on_the_polling_thread,
    check_poll_returns_each_partitions_records_in_offset_order,
    check_poll_waits_at_most_its_timeout,
    check_start_offsets_apply_on_assignment,
    check_commit_round_trips_through_committed_offsets,
    check_seek_rewinds_listed_partitions_and_the_rest_to_the_committed_offset,
    check_a_new_member_resumes_at_the_committed_offsets,
    check_keepalive_takes_no_record,
    check_highwater_is_the_next_offset_to_be_written,
    check_an_assigned_member_is_connected_and_has_group_metadata,
    check_close_is_idempotent,
    check_a_joining_member_takes_partitions_after_a_revocation,
    check_a_partition_kept_through_a_rebalance_resumes_at_the_committed_offset,
    check_a_revocation_hook_may_commit,
]


# -- output sinks ----------------------------------------------------------------------------------
def messages(topic: str, start: int, count: int) -> list[OutputMessage]:
    """Messages with and without keys and headers."""
    return [
        OutputMessage(
            topic,
            None if i % 3 == 0 else b"k%d" % i,
            b"v%d" % i,
            [] if i % 2 == 0 else [("h", b"%d" % i), ("streamvi.x", b"")],
        )
        for i in range(start, start + count)
    ]


def seen(sent: Sequence[OutputMessage]) -> list[Seen]:
    return [(m.key, m.value, list(m.headers)) for m in sent]


def check_flush_makes_what_was_sent_visible_intact_and_in_order(world: SinkWorld) -> None:
    sink = world.sink(transactional=False)
    try:
        sent = messages(world.topic, 0, 5)
        for message in sent[:2]:
            sink.send(message)
        sink.send_many(sent[2:])
        sink.flush()
        assert world.visible(expected=5) == seen(sent)
        sink.flush()  # nothing pending
        sink.flush(timeout_seconds=5.0)
    finally:
        sink.close()


def check_close_flushes_and_is_idempotent(world: SinkWorld) -> None:
    for transactional in (False, True):
        sink = world.sink(transactional)
        sink.close()
        sink.close()
    sink = world.sink(transactional=False)
    sent = messages(world.topic, 0, 3)
    sink.send_many(sent)
    sink.close()
    sink.close()
    assert world.visible(expected=3) == seen(sent)


def check_a_plain_sink_has_no_transactions(world: SinkWorld) -> None:
    """A non-transactional sink refuses ``commit_transaction`` naming the setting, and
    ``abort_transaction`` drops nothing."""
    sink = world.sink(transactional=False)
    try:
        assert sink.transactional is False
        with pytest.raises(StreamVIError, match="exactly_once"):
            sink.commit_transaction({world.partition: 1}, world.group_metadata())
        sent = messages(world.topic, 0, 2)
        sink.send_many(sent)
        sink.abort_transaction()
        sink.flush()
        assert world.visible(expected=2) == seen(sent)
        assert world.committed() == {}
    finally:
        sink.close()


def check_an_undeliverable_message_fails_the_next_flush_once(world: SinkWorld) -> None:
    bad = world.undeliverable()
    if bad is None:
        pytest.skip("this sink delivers every message")
    sink = world.sink(transactional=False)
    try:
        sink.send(bad)
        with pytest.raises(OutputError, match="not delivered"):
            sink.flush()
        sink.flush()  # reported once
        sent = messages(world.topic, 0, 1)
        sink.send_many(sent)
        sink.flush()
        assert world.visible(expected=1) == seen(sent)
    finally:
        sink.close()


def check_a_committed_transaction_is_visible_with_its_offsets(world: SinkWorld) -> None:
    sink = world.sink(transactional=True)
    try:
        assert sink.transactional is True
        sent = messages(world.topic, 0, 4)
        sink.send_many(sent)
        sink.commit_transaction({world.partition: 10}, world.group_metadata())
        assert world.visible(expected=4) == seen(sent)
        assert world.committed() == {world.partition: 10}
    finally:
        sink.close()


def check_outputs_stay_invisible_until_their_transaction_commits(world: SinkWorld) -> None:
    sink = world.sink(transactional=True)
    try:
        sent = messages(world.topic, 0, 3)
        sink.send_many(sent)
        sink.flush()  # durable, yet not visible to read_committed
        assert world.visible(expected=0) == []
        assert world.committed() == {}
        sink.commit_transaction({world.partition: 3}, world.group_metadata())
        assert world.visible(expected=3) == seen(sent)
    finally:
        sink.close()


def check_an_aborted_transaction_is_never_visible(world: SinkWorld) -> None:
    """An aborted transaction's outputs are never visible, its offsets never committed; the next
    send starts a new transaction."""
    sink = world.sink(transactional=True)
    try:
        committed_first, aborted, committed_last = (messages(world.topic, 3 * i, 3) for i in range(3))
        sink.send_many(committed_first)
        sink.commit_transaction({world.partition: 1}, world.group_metadata())
        sink.send_many(aborted)
        sink.flush()
        sink.abort_transaction()
        assert world.committed() == {world.partition: 1}
        sink.abort_transaction()  # nothing open: nothing happens
        sink.send_many(committed_last)
        sink.commit_transaction({world.partition: 3}, world.group_metadata())
        assert world.visible(expected=6) == seen(committed_first + committed_last)
        assert world.committed() == {world.partition: 3}
    finally:
        sink.close()


def check_a_transaction_may_commit_offsets_alone(world: SinkWorld) -> None:
    """A checkpoint interval that output nothing still commits its offsets in a transaction."""
    sink = world.sink(transactional=True)
    try:
        sink.commit_transaction({world.partition: 5}, world.group_metadata())
        assert world.committed() == {world.partition: 5}
        assert world.visible(expected=0) == []
    finally:
        sink.close()


def check_close_aborts_an_open_transaction(world: SinkWorld) -> None:
    sink = world.sink(transactional=True)
    sink.send_many(messages(world.topic, 0, 2))
    sink.close()
    sink.close()
    assert world.visible(expected=0) == []
    assert world.committed() == {}


SINK_CHECKS = [
    check_flush_makes_what_was_sent_visible_intact_and_in_order,
    check_close_flushes_and_is_idempotent,
    check_a_plain_sink_has_no_transactions,
    check_an_undeliverable_message_fails_the_next_flush_once,
    check_a_committed_transaction_is_visible_with_its_offsets,
    check_outputs_stay_invisible_until_their_transaction_commits,
    check_an_aborted_transaction_is_never_visible,
    check_a_transaction_may_commit_offsets_alone,
    check_close_aborts_an_open_transaction,
]


def check_id(check: Callable[..., None]) -> str:
    return check.__name__.removeprefix("check_")
