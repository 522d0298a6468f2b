"""What a step returns: the prequential per-record scores and the update's figures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchScores:
    """Per-record results for the real records of a batch, computed before any update."""

    bound: np.ndarray
    kl: np.ndarray
    reconstruction: np.ndarray
    z_loc: np.ndarray
    z_scale: np.ndarray
    #: Per record, the input groups with the lowest log-likelihood (most negative first) and
    #: their values [n, k], when the trainer explains scores (anomaly.explain_top_k), else None.
    explain_index: np.ndarray | None = None
    explain_value: np.ndarray | None = None

    @classmethod
    def unpack(cls, packed: np.ndarray, n: int, summary_size: int, explain_k: int = 0) -> BatchScores:
        rows = packed[:n]
        start = 3 + 2 * summary_size
        return cls(
            bound=rows[:, 0],
            kl=rows[:, 1],
            reconstruction=rows[:, 2],
            z_loc=rows[:, 3 : 3 + summary_size],
            z_scale=rows[:, 3 + summary_size : start],
            explain_index=rows[:, start : start + explain_k].astype(np.int64) if explain_k else None,
            explain_value=rows[:, start + explain_k : start + 2 * explain_k] if explain_k else None,
        )

    @property
    def size(self) -> int:
        return int(self.bound.shape[0])


@dataclass(frozen=True)
class StepResult:
    """What one step reports: the prequential per-record scores and the update's figures.

    ``trained`` is False when no row of the batch was trainable (all held out): it was only scored.
    """

    scores: BatchScores
    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    duration_seconds: float
    trained_records: int
    #: False when the loss or the gradients were not finite and the update was skipped.
    applied: bool = True
    #: True when the model's gradient norm exceeded ``training.clip_grad_norm`` and was clipped
    #: (the update is then a biased estimate of the bound's gradient).
    clipped: bool = False
    #: Whether the step counted (some row was trainable), even if every such row was then left
    #: out as a flagged anomaly (``trained_records`` 0); None: whenever it trained.
    counted: bool | None = None
    #: Trainable rows left out of the update because their bound was below the training floor.
    excluded_records: int = 0
    #: Whether the model that scored the batch was ready (its normaliser past the warm-up): the
    #: scores of a model that has not learned yet are no reference for anomalies.
    model_ready: bool = True
    #: Further updates this step made on batches drawn from the rehearsal window, that applied.
    rehearsal_updates: int = 0

    @property
    def trained(self) -> bool:
        """Whether the step counted: the step counter moved and its figures are reported."""
        return self.trained_records > 0 if self.counted is None else self.counted

    def summary(self) -> dict[str, float]:
        """Batch means of the prequential bound and its parts."""
        return {
            "elbo": float(np.mean(self.scores.bound)),
            "kl": float(np.mean(self.scores.kl)),
            "reconstruction": float(np.mean(self.scores.reconstruction)),
        }
