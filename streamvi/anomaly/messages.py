"""Anomalies-topic messages: one per flagged record, keyed like its input (DESIGN.md contracts)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import orjson

from streamvi.anomaly.monitor import Verdict
from streamvi.io.base import OutputMessage, RawRecord


def anomaly_messages(
    topic: str,
    records: Sequence[RawRecord],
    record_ids: Sequence[str | None],
    bound: np.ndarray,
    verdict: Verdict,
    *,
    model_step: int,
    bound_name: str,
    threshold_percentile: float,
    threshold_elbo: float,
    snapshot: str | None = None,
    explanations: Sequence[bytes] | None = None,
) -> list[OutputMessage]:
    """The flagged records of a batch: id, source position, score, percentile, the threshold ELBO it
    was flagged against, model step (and the snapshot that scored it, and the explanation when
    there is one). Flags are rare, so each
    message is built as one object."""
    messages = []
    for i in np.flatnonzero(verdict.flagged).tolist():
        record = records[i]
        percentile = None if verdict.percentiles is None else _finite32(verdict.percentiles[i])
        payload: dict[str, object] = {
            "id": record_ids[i],
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "model_step": model_step,
            "bound": bound_name,
            "elbo": np.float32(bound[i]) if math.isfinite(bound[i]) else None,  # as the latents write it
            "anomaly_percentile": percentile,
            "threshold_percentile": threshold_percentile,
            "threshold_elbo": _finite(threshold_elbo),
        }
        if snapshot is not None:
            payload["snapshot"] = snapshot
        value = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
        if explanations is not None:
            value = value[:-1] + b',"explanation":' + explanations[i] + b"}"
        messages.append(OutputMessage(topic=topic, key=record.key, value=value))
    return messages


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _finite32(value: float) -> np.float32 | None:
    """A float32 figure written as the latents write it (shortest float32 form), or null."""
    return np.float32(value) if math.isfinite(value) else None
