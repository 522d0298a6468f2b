"""What the kafka-python and the librdkafka adapters share, whichever client library talks to Kafka.

- :class:`GroupSource`: a consumer-group source's state (start offsets, offsets whose commit failed,
  the loop's rebalance hooks), commit with its failure bookkeeping, and the paused keep-alive poll.
- :class:`Liveness`: when the broker last answered, and how long that counts as connected.
- :class:`FailureLatch`: the first delivery failure since the last flush, set from client threads.
- :class:`KafkaSink`, :class:`TransactionalSink`: flush and close over the latch, and the
  transaction lifecycle (begin; fence and restart with back-off; commit with the offsets; abort).
- :func:`security_settings`: the SASL and TLS settings each adapter renames for its client.

An adapter supplies only what its client library does differently, in that library's vocabulary;
what the core logs goes to the adapter's logger (``_log``).
"""

from streamvi.io.kafka_core.group import GroupSource, Liveness
from streamvi.io.kafka_core.options import security_settings
from streamvi.io.kafka_core.sinks import Backoff, FailureLatch, KafkaSink, TransactionalSink

__all__ = [
    "Backoff",
    "FailureLatch",
    "GroupSource",
    "KafkaSink",
    "Liveness",
    "TransactionalSink",
    "security_settings",
]
