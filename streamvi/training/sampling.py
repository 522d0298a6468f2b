"""Deterministic shares of the stream by record key: the trainer's sample (``training.sample_fraction``).

A record's identity is its key, or its origin (topic/partition/offset) when it has none; the same
record falls in the same share in every run, on every replica and after every restart. The
held-out reservoir hashes the identity with CRC-32; the training sample uses keyed BLAKE2b, whose
value is independent of the CRC, so the sample does not favour or avoid held-out records.
"""

from __future__ import annotations

import hashlib

from streamvi.io.base import RawRecord

_PERSON = b"streamvi-sample"


def record_identity(record: RawRecord) -> bytes:
    """The bytes a record's shares are chosen by: its key, or its origin without one."""
    if record.key is not None:
        return record.key
    return f"{record.topic}/{record.partition}/{record.offset}".encode()


class TrainingSample:
    """Selects ``fraction`` of the records by a 64-bit hash of their identity."""

    def __init__(self, fraction: float) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"a sample fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self._threshold = int(fraction * 2**64)

    def selects(self, record: RawRecord) -> bool:
        if self.fraction >= 1.0:
            return True
        digest = hashlib.blake2b(record_identity(record), digest_size=8, person=_PERSON).digest()
        return int.from_bytes(digest, "little") < self._threshold
