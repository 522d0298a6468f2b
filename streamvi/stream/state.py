"""What the stream path keeps and is told: running counts, consumed offsets, policies, topics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamvi.io.base import Partition
from streamvi.training.heldout import HeldOutReservoir
from streamvi.training.history import StepHistory


@dataclass(frozen=True)
class OutputTopics:
    """Where outputs go. A trainer beside encoder replicas publishes neither latents nor dead
    letters (``None``): the replicas see every record and publish both; it still counts bad records."""

    latents: str | None
    metrics: str
    dead_letter: str | None
    #: Flagged records (streamvi/anomaly), or None: not published.
    anomalies: str | None = None


@dataclass
class LoopCounts:
    """Running totals, saved in every snapshot and restored with it."""

    records_consumed: int = 0
    records_trained: int = 0
    dead_letters: int = 0
    latents_published: int = 0
    steps: int = 0
    snapshots: int = 0
    updates_skipped: int = 0
    records_skipped: int = 0
    anomalies_flagged: int = 0
    flagged_not_trained: int = 0
    drifts_detected: int = 0

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> LoopCounts:
        known = {k: int(v) for k, v in meta.get("counts", {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class CheckpointPolicy:
    every_steps: int
    every_seconds: float


@dataclass
class EvaluationPolicy:
    """Held-out evaluation: every ``every_steps`` steps, ELBO and IWAE-k log-likelihood on the reservoir."""

    reservoir: HeldOutReservoir
    every_steps: int
    importance_samples: int
    #: The newest held-out records saved with every snapshot (``snapshots.sample_records``).
    snapshot_sample_records: int = 0


@dataclass
class ProcessingPolicy:
    """Delivery guarantee and fault handling (``processing.*``)."""

    exactly_once: bool = False
    max_nonfinite_in_a_row: int = 10
    #: Poll the source (partitions paused) this often while a step or snapshot is still running;
    #: None runs them inline with no keep-alive.
    keepalive_seconds: float | None = None
    retry_initial_seconds: float = 0.5
    retry_max_seconds: float = 10.0


@dataclass
class LoopState:
    """What the loop has consumed: next offset per partition and the last step's summary."""

    next_offsets: dict[Partition, int] = field(default_factory=dict)
    last_summary: dict[str, float] = field(default_factory=dict)
    last_heldout: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamState:
    """Everything a snapshot records about the stream besides the trainer: counts, offsets, the
    last step's figures and the step history. Restoring a snapshot replaces it whole."""

    counts: LoopCounts = field(default_factory=LoopCounts)
    loop: LoopState = field(default_factory=LoopState)
    history: StepHistory = field(default_factory=StepHistory)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], offsets: Mapping[Partition, int]) -> StreamState:
        return cls(
            counts=LoopCounts.from_meta(meta),
            loop=LoopState(next_offsets=dict(offsets), last_summary=dict(meta.get("metrics", {}))),
            history=StepHistory.from_meta(meta),
        )
