"""Gradient estimators of the ELBO, one small strategy class each, chosen by ``training.estimator``."""

from __future__ import annotations

from streamvi.config import TrainingSettings
from streamvi.errors import ConfigError
from streamvi.estimators.base import BoundTerms, Estimator
from streamvi.estimators.sgvb import SGVBAnalyticKL

ESTIMATORS: dict[str, type[Estimator]] = {cls.name: cls for cls in (SGVBAnalyticKL,)}


def build_estimator(settings: TrainingSettings) -> Estimator:
    """The estimator named by ``training.estimator`` with its hyperparameters from the settings."""
    try:
        cls = ESTIMATORS[settings.estimator]
    except KeyError:
        raise ConfigError(
            f"training.estimator: unknown estimator {settings.estimator!r}; known: {sorted(ESTIMATORS)}"
        ) from None
    return cls(samples=settings.samples)


__all__ = ["ESTIMATORS", "BoundTerms", "Estimator", "SGVBAnalyticKL", "build_estimator"]
