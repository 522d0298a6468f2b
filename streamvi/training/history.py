"""A bounded per-step history of the training bound, saved in every snapshot for offline reports.

The metrics topic carries every step, but it has a retention period and needs a broker to read.
A snapshot therefore keeps its own copy, bounded in size whatever the run length: when the
history is full, every other point is dropped and from then on only every ``stride``-th step is
kept, so the whole run stays covered at an even resolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The per-step values kept, besides the step number itself.
FIELDS = ("elbo", "kl", "reconstruction")


class StepHistory:
    """Step, ELBO, KL and reconstruction of at most ``capacity`` evenly spaced steps."""

    def __init__(self, capacity: int = 2048) -> None:
        if capacity < 2:
            raise ValueError("capacity must be >= 2")
        self.capacity = capacity
        self.stride = 1
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {name: [] for name in FIELDS}

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, step: int, summary: Mapping[str, float]) -> None:
        """Record one step's batch means, if the step falls on the current stride."""
        if step % self.stride != 0:
            return
        while len(self.steps) >= self.capacity:
            self.stride *= 2
            keep = [i for i, s in enumerate(self.steps) if s % self.stride == 0]
            self.steps = [self.steps[i] for i in keep]
            self.values = {name: [column[i] for i in keep] for name, column in self.values.items()}
            if step % self.stride != 0:
                return
        self.steps.append(int(step))
        for name in FIELDS:
            self.values[name].append(float(summary.get(name, float("nan"))))

    def to_json(self) -> dict[str, Any]:
        """Columns as plain lists (non-finite values as null, which JSON allows)."""
        return {
            "stride": self.stride,
            "step": list(self.steps),
            **{
                name: [v if v == v and abs(v) != float("inf") else None for v in column]
                for name, column in self.values.items()
            },
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], capacity: int = 2048) -> StepHistory:
        """The history saved in a snapshot's meta.json; empty if it has none."""
        history = cls(capacity)
        saved = meta.get("history")
        if not isinstance(saved, Mapping):
            return history
        history.stride = max(1, int(saved.get("stride", 1)))
        history.steps = [int(s) for s in saved.get("step", [])]
        for name in FIELDS:
            column = saved.get(name, [])
            history.values[name] = [float("nan") if v is None else float(v) for v in column]
            if len(history.values[name]) != len(history.steps):
                return cls(capacity)
        return history
