"""The stream path: ingest, batching, the step pipeline, outputs, checkpoints, recovery, the processor.

Kafka-free: it sees only the io.base interfaces (RecordSource, OutputSink). The processor
(``StreamProcessor``) wires the rooms together; each room is a module of its own. Two roles run on
it: the trainer (``OnlineLoop``: score, train, snapshot) and the encoder replica (``EncoderLoop``:
score with the newest trusted snapshot, commit offsets).
"""

from streamvi.stream.batching import MicroBatcher
from streamvi.stream.encoder import EncoderLoop
from streamvi.stream.ingest import TrainingShare
from streamvi.stream.online import OnlineLoop
from streamvi.stream.processor import StreamProcessor
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
    "EncoderLoop",
    "EvaluationPolicy",
    "LoopCounts",
    "LoopState",
    "MicroBatcher",
    "OnlineLoop",
    "OutputTopics",
    "ProcessingPolicy",
    "StreamProcessor",
    "StreamState",
    "TrainingShare",
]
