"""The bounded per-step history kept in snapshots for offline reports."""

from __future__ import annotations

import json
import math

import pytest

from streamvi.training.history import StepHistory


def summary(step: int) -> dict[str, float]:
    return {"elbo": -float(step), "kl": step / 10, "reconstruction": -1.1 * step}


def test_keeps_every_step_until_full():
    history = StepHistory(capacity=8)
    for step in range(1, 8):
        history.add(step, summary(step))
    assert history.steps == list(range(1, 8))
    assert history.values["kl"] == [pytest.approx(s / 10) for s in range(1, 8)]
    assert history.stride == 1


def test_stays_bounded_and_evenly_covers_a_long_run():
    history = StepHistory(capacity=100)
    for step in range(1, 10_001):
        history.add(step, summary(step))
    assert len(history) <= 100
    assert len(history) >= 50
    gaps = {b - a for a, b in zip(history.steps, history.steps[1:], strict=False)}
    assert gaps == {history.stride}
    assert history.steps[0] <= history.stride and history.steps[-1] > 10_000 - history.stride
    assert history.values["elbo"] == [-float(s) for s in history.steps]


def test_round_trips_through_snapshot_meta_and_keeps_counting():
    history = StepHistory(capacity=16)
    for step in range(1, 41):
        history.add(step, summary(step))
    history.add(41, {"elbo": math.nan, "kl": 1.0, "reconstruction": math.inf})
    meta = json.loads(json.dumps({"history": history.to_json()}, allow_nan=False))
    restored = StepHistory.from_meta(meta, capacity=16)
    assert restored.steps == history.steps and restored.stride == history.stride
    for step in range(42, 200):
        restored.add(step, summary(step))
        history.add(step, summary(step))
    assert restored.steps == history.steps
    assert restored.values["kl"] == history.values["kl"]


def test_missing_or_inconsistent_history_gives_an_empty_one():
    assert len(StepHistory.from_meta({})) == 0
    bad = {"history": {"stride": 1, "step": [1, 2], "elbo": [1.0], "kl": [1.0, 2.0], "reconstruction": []}}
    assert len(StepHistory.from_meta(bad)) == 0
