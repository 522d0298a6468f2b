"""The SGVI step: the trainer, the held-out reservoir and the step history (no Kafka, no stream here)."""

from streamvi.training.heldout import HeldOutReservoir
from streamvi.training.trainer import BatchScores, StepResult, Trainer, build_optimizer

__all__ = [
    "BatchScores",
    "HeldOutReservoir",
    "StepResult",
    "Trainer",
    "build_optimizer",
]
