"""Gradient estimators of the ELBO and its importance-weighted relatives, one strategy class each."""

from __future__ import annotations

from streamvi.config import Settings
from streamvi.errors import ConfigError
from streamvi.estimators.base import BoundTerms, Estimator, log_likelihood_estimate
from streamvi.estimators.iwae import DoublyReparameterized, ImportanceWeighted
from streamvi.estimators.score_function import ScoreFunction
from streamvi.estimators.sgvb import SGVBAnalyticKL, SGVBMonteCarlo, StickingTheLanding
from streamvi.features.schema import FeatureLayout

ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls
    for cls in (
        SGVBMonteCarlo,
        SGVBAnalyticKL,
        ImportanceWeighted,
        StickingTheLanding,
        DoublyReparameterized,
        ScoreFunction,
    )
}


def _input_width(settings: Settings) -> int:
    """Columns the encoder (and a learned baseline) sees per record."""
    features = settings.input.features
    width = FeatureLayout(tuple(features)).encoder_width if features is not None else settings.input.dim
    return width + settings.input.context_dim


def build_estimator(settings: Settings) -> Estimator:
    """The estimator named by ``training.estimator`` with its hyperparameters from the settings."""
    training = settings.training
    if training.estimator == ScoreFunction.name:
        return ScoreFunction(
            samples=training.samples,
            baseline=training.baseline,
            decay=training.baseline_decay,
            input_width=_input_width(settings),
            hidden=training.baseline_hidden,
            seed=training.seed,
        )
    try:
        cls = ESTIMATORS[training.estimator]
    except KeyError:
        raise ConfigError(
            f"training.estimator: unknown estimator {training.estimator!r}; known: {sorted(ESTIMATORS)}"
        ) from None
    return cls(samples=training.samples)


__all__ = [
    "ESTIMATORS",
    "BoundTerms",
    "DoublyReparameterized",
    "Estimator",
    "ImportanceWeighted",
    "SGVBAnalyticKL",
    "SGVBMonteCarlo",
    "ScoreFunction",
    "StickingTheLanding",
    "build_estimator",
    "log_likelihood_estimate",
]
