"""The stream path: ingest, batching, the step pipeline, outputs, checkpoints, recovery, the processor.

Kafka-free: it sees only the io.base interfaces (RecordSource, OutputSink). The processor
(``OnlineLoop``) wires the rooms together; each room is a module of its own.
"""

from streamvi.stream.batching import MicroBatcher
from streamvi.stream.processor import OnlineLoop
from streamvi.stream.state import (
    CheckpointPolicy,
    EvaluationPolicy,
    LoopCounts,
    LoopState,
    OutputTopics,
    ProcessingPolicy,
    StreamState,
)

__all__ = [
    "CheckpointPolicy",
    "EvaluationPolicy",
    "LoopCounts",
    "LoopState",
    "MicroBatcher",
    "OnlineLoop",
    "OutputTopics",
    "ProcessingPolicy",
    "StreamState",
]
