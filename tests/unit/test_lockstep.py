"""The lockstep rule on all-reduced rounds (the collective itself: tests/unit/test_distributed.py)."""

from __future__ import annotations

import pytest

from streamvi.training.lockstep import Agreement, Round, gather_offsets


def sums(*rounds: Round) -> list[float]:
    return [sum(values) for values in zip(*(r.vector() for r in rounds), strict=True)]


def test_one_full_worker_closes_every_workers_batch():
    agreement = Agreement.of_sums(sums(Round(8, full=True), Round(0)))
    assert agreement.close and agreement.rows == 8 and not agreement.stop and not agreement.idle


def test_a_due_record_anywhere_closes_and_partial_batches_wait_otherwise():
    assert Agreement.of_sums(sums(Round(3, due=True), Round(2))).close
    waiting = Agreement.of_sums(sums(Round(3), Round(2)))
    assert not waiting.close and waiting.rows == 5 and not waiting.idle


def test_idle_everywhere_closes_nothing_and_waits():
    agreement = Agreement.of_sums(sums(Round(0), Round(0)))
    assert not agreement.close and agreement.idle


def test_one_stopping_worker_stops_all_after_closing_what_there_is():
    assert Agreement.of_sums(sums(Round(0), Round(0, stopping=True))) == Agreement(False, 0, True)
    assert Agreement.of_sums(sums(Round(4), Round(0, stopping=True))) == Agreement(True, 4, True)


def test_a_due_checkpoint_anywhere_closes_every_batch_and_checkpoints_everywhere():
    agreement = Agreement.of_sums(sums(Round(2), Round(0, checkpoint=True)))
    assert agreement.close and agreement.checkpoint and not agreement.stop
    assert Agreement.of_sums(sums(Round(0), Round(0, checkpoint=True))).checkpoint  # even with nothing open


def test_a_rewind_anywhere_rewinds_every_worker_and_closes_nothing():
    agreement = Agreement.of_sums(sums(Round(5, full=True, checkpoint=True), Round(0, rewind=True)))
    assert agreement.rewind and not agreement.close and not agreement.checkpoint


def test_a_drift_found_by_one_worker_is_answered_by_every_worker_and_a_rewind_drops_it():
    agreement = Agreement.of_sums(sums(Round(3, full=True), Round(2, drift=True)))
    assert agreement.drift and agreement.close
    assert not Agreement.of_sums(sums(Round(3, full=True), Round(2))).drift
    assert not Agreement.of_sums(sums(Round(0, drift=True), Round(0, rewind=True))).drift


def test_the_idle_timeout_stops_the_workers_only_once_every_one_is_idle():
    assert not Agreement.of_sums(sums(Round(0, idle=True), Round(3))).stop
    assert Agreement.of_sums(sums(Round(0, idle=True), Round(0, idle=True))).stop


class Gathered:
    """What the collective returns on every worker: each worker's flat list (the merge is tested
    here; the collective itself in tests/unit/test_distributed.py)."""

    def __init__(self, *per_worker: dict) -> None:
        self.lists = [[v for (_, p), o in sorted(d.items()) for v in (p, o)] for d in per_worker]

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        return self.lists


def test_gathered_offsets_merge_and_an_idle_worker_adds_nothing():
    merged = gather_offsets(Gathered({("t", 0): 5}, {}, {("t", 2): 7}), "t", {("t", 0): 5})
    assert merged == {("t", 0): 5, ("t", 2): 7}


def test_a_partition_claimed_twice_or_a_foreign_topic_is_an_error():
    with pytest.raises(ValueError, match="claimed by worker 1"):
        gather_offsets(Gathered({("t", 0): 5}, {("t", 0): 6}), "t", {})
    with pytest.raises(ValueError, match="only 't'"):
        gather_offsets(Gathered(), "t", {("u", 0): 1})
