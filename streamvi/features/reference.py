"""The per-record reference decoder for feature schemas: one record, one feature, one value at a time.

It states the rules plainly (``FeatureSpec.code`` converts each value) so that the whole-fetch
decoder (:mod:`streamvi.features.assemble`) can be held to it record by record, good or bad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from streamvi.features.schema import MISSING, OK, WRONG_TYPE, FeatureSpec
from streamvi.features.values import NOT_AN_OBJECT, feature_error
from streamvi.io.codecs import DecodeError


def value_at(document: dict[str, Any], keys: Sequence[str]) -> Any:
    """The value at a dotted path; None when absent or null on the way, NOT_AN_OBJECT when the path
    runs through a value that is not an object."""
    node: Any = document
    for key in keys:
        if node is None:
            return None
        if type(node) is not dict:
            return NOT_AN_OBJECT
        node = node.get(key)
    return node


def decode_features(features: Sequence[FeatureSpec], document: dict[str, Any]) -> np.ndarray:
    """The float32 model vector of one document (NaN = masked); DecodeError for a dead letter."""
    row = np.zeros(len(features), dtype=np.float32)
    for j, feature in enumerate(features):
        value = value_at(document, feature.keys)
        status, number = (WRONG_TYPE, math.nan) if value is NOT_AN_OBJECT else feature.code(value)
        if status != OK:
            policy = feature.missing if status == MISSING else feature.malformed
            if policy == "dead_letter":
                raise feature_error(feature, status, value)
            default = feature.default_code() if policy == "default" else None
            number = math.nan if default is None else default
        row[j] = number
    return row


def decode_json_record(
    features: Sequence[FeatureSpec], value: bytes | None, max_bytes: int
) -> tuple[np.ndarray, str | None]:
    """(vector, id) of one JSON record value, or DecodeError: size, JSON, object, id, then features."""
    if value is None or len(value) == 0:
        raise DecodeError("empty_value", "the record has no value")
    if len(value) > max_bytes:
        raise DecodeError("oversize", f"{len(value)} bytes exceeds input.max_record_bytes={max_bytes}")
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("wrong_encoding", "the value is not valid UTF-8") from None
        raise DecodeError("invalid_json", str(exc)) from None
    if not isinstance(document, dict):
        raise DecodeError("not_an_object", f"expected a JSON object, got {type(document).__name__}")
    record_id = document.get("id")
    if isinstance(record_id, bool) or not (record_id is None or isinstance(record_id, str | int)):
        raise DecodeError(
            "wrong_type", f"'id' must be a string or an integer, got {type(record_id).__name__}"
        )
    return decode_features(features, document), None if record_id is None else str(record_id)
