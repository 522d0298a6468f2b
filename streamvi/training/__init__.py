"""The SGVI step and the online loop (no Kafka in here: the loop sees only io.base interfaces)."""

from streamvi.training.batching import MicroBatcher
from streamvi.training.heldout import HeldOutReservoir
from streamvi.training.loop import CheckpointPolicy, EvaluationPolicy, LoopCounts, OnlineLoop, OutputTopics
from streamvi.training.trainer import BatchScores, StepResult, Trainer, build_optimizer

__all__ = [
    "BatchScores",
    "CheckpointPolicy",
    "EvaluationPolicy",
    "HeldOutReservoir",
    "LoopCounts",
    "MicroBatcher",
    "OnlineLoop",
    "OutputTopics",
    "StepResult",
    "Trainer",
    "build_optimizer",
]
