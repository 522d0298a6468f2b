"""What a detected drift does to training (``anomaly.drift_response``), one strategy class each.

A response keeps its bookkeeping on the loop's thread and returns the change to the optimizer as a
callable, which the loop runs on the step thread behind the steps already queued, so no step sees
a half-changed optimizer. Its state (a raised learning rate's steps left) is part of the snapshot's
anomaly state, so a restart during a raise ends it on time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from streamvi.config import AnomalySettings
from streamvi.training.trainer import Trainer

log = logging.getLogger(__name__)

#: A change to the optimizer, run on the step thread between two steps.
Change = Callable[[], None]


class DriftResponse:
    """No change to training: the drift is only reported (and the snapshot before it tagged)."""

    name = "none"

    def on_drift(self, trainer: Trainer) -> Change | None:
        """Called once per detected drift; returns the change to run on the step thread."""
        return None

    def after_step(self, trainer: Trainer) -> Change | None:
        """Called after each published training step; returns the change to run, if any."""
        return None

    @property
    def active(self) -> bool:
        """Whether the response is still changing training."""
        return False

    def state(self) -> dict[str, Any]:
        return {}

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`."""


class ResetOptimizer(DriftResponse):
    """Zero the optimizer's moments and its iteration count: the next steps are those of a fresh
    optimizer (for Adam, bias-corrected steps of about the learning rate), not ones damped by
    moments of the old stream. The model's parameters and step counter stay."""

    name = "reset_optimizer"

    def on_drift(self, trainer: Trainer) -> Change | None:
        def reset() -> None:
            for variable in trainer.optimizer.variables:
                variable.assign(tf.zeros_like(variable))
            log.warning("drift response: optimizer moments reset")

        return reset


class RaiseLearningRate(DriftResponse):
    """Multiply the learning rate by ``factor`` for ``steps`` training steps, then put it back."""

    name = "raise_learning_rate"

    def __init__(self, factor: float, steps: int) -> None:
        self.factor = factor
        self.steps = steps
        self.steps_left = 0
        self.base_rate: float | None = None

    @property
    def active(self) -> bool:
        return self.steps_left > 0

    def on_drift(self, trainer: Trainer) -> Change | None:
        if self.base_rate is None:
            self.base_rate = float(trainer.optimizer.learning_rate.numpy())
        raised, steps = self.base_rate * self.factor, self.steps
        self.steps_left = steps

        def raise_rate() -> None:
            trainer.optimizer.learning_rate.assign(raised)
            log.warning("drift response: learning rate %.3g for %d steps", raised, steps)

        return raise_rate

    def after_step(self, trainer: Trainer) -> Change | None:
        if self.steps_left <= 0:
            return None
        self.steps_left -= 1
        if self.steps_left > 0 or self.base_rate is None:
            return None
        base, self.base_rate = self.base_rate, None

        def restore_rate() -> None:
            trainer.optimizer.learning_rate.assign(base)
            log.info("drift response: learning rate back to %.3g", base)

        return restore_rate

    def state(self) -> dict[str, Any]:
        return {"steps_left": self.steps_left, "base_rate": self.base_rate}

    def load(self, state: dict[str, Any]) -> None:
        self.steps_left = int(state.get("steps_left", 0))
        base = state.get("base_rate")
        self.base_rate = None if base is None else float(base)


def build_response(settings: AnomalySettings) -> DriftResponse:
    """The configured response."""
    if settings.drift_response == "reset_optimizer":
        return ResetOptimizer()
    if settings.drift_response == "raise_learning_rate":
        return RaiseLearningRate(settings.learning_rate_factor, settings.learning_rate_steps)
    return DriftResponse()
