"""What both feature decoders share: the marker of a path through a non-object, and dead-letter text."""

from __future__ import annotations

from typing import Any

from streamvi.features.schema import STATUS_REASONS, STATUS_WORDS, WRONG_TYPE, FeatureSpec
from streamvi.io.codecs import DecodeError


class _NotAnObject:
    """The value of a path that runs through something other than an object (a malformed record)."""

    def __repr__(self) -> str:
        return "<not an object>"


NOT_AN_OBJECT: Any = _NotAnObject()


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def feature_error(feature: FeatureSpec, status: int, value: Any) -> DecodeError:
    """The dead letter for a bad value of ``feature``: its reason, and a detail naming the feature."""
    where = feature.name if feature.source == feature.name else f"{feature.name} (path {feature.source})"
    detail = f"feature {where} {STATUS_WORDS[status]}"
    if value is NOT_AN_OBJECT:
        detail += ": its path runs through a value that is not an object"
    elif status == WRONG_TYPE:
        detail += f": expected a {feature.type} value, got {type(value).__name__}"
    elif value is not None:
        detail += f": {_shown(value)}"
    return DecodeError(STATUS_REASONS[status], detail)
