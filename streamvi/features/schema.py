"""The feature schema: which fields of an event feed the model, as what, and what to do when one is bad.

Each feature takes one value from a record (``path``, dotted for nested objects: ``metrics.cpu``)
and fills one column of the model vector:

- ``numeric``: a real number; standardised online, Gaussian likelihood;
- ``binary``: true/false or 0/1; Bernoulli likelihood;
- ``categorical``: one of a ``vocabulary`` (strings or integers), stored as its index; categorical
  likelihood, one-hot for the encoder;
- ``hashed``: any string or integer, hashed (CRC-32 of its text) into ``buckets``; categorical
  likelihood over the buckets;
- ``count``: a non-negative integer; Poisson likelihood.

``missing`` (absent or null) and ``malformed`` (wrong type, out of range, not in the vocabulary)
each choose ``mask`` (the dimension is left out of the likelihood and the encoder is told),
``default`` (use ``default``) or ``dead_letter`` (the record goes to the dead-letter topic).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, model_validator

FeatureType = Literal["numeric", "binary", "categorical", "hashed", "count"]
Policy = Literal["mask", "default", "dead_letter"]

#: Status of one value of one record, as the decoders assign it (0 = a good value).
OK, MISSING, WRONG_TYPE, NON_FINITE, OUT_OF_RANGE, UNKNOWN_CATEGORY = range(6)
#: The dead-letter reason of each bad status.
STATUS_REASONS = {
    MISSING: "missing_field",
    WRONG_TYPE: "wrong_type",
    NON_FINITE: "non_finite",
    OUT_OF_RANGE: "out_of_range",
    UNKNOWN_CATEGORY: "unknown_category",
}
#: What each bad status means, for the dead letter's detail.
STATUS_WORDS = {
    MISSING: "is missing",
    WRONG_TYPE: "has the wrong type",
    NON_FINITE: "is beyond float32 range",
    OUT_OF_RANGE: "is outside the feature's range",
    UNKNOWN_CATEGORY: "is not in the vocabulary",
}
_FLOAT32_MAX = 3.4028234663852886e38
_Type = type


def as_float(value: int | float) -> float:
    """A JSON number as a float; an integer too large for a double is infinite."""
    return float(value) if type(value) is float or abs(value) < 2**1023 else math.copysign(math.inf, value)


def hash_bucket(value: str | int, buckets: int) -> int:
    """The bucket of a hashed categorical value: CRC-32 of its text, stable across processes."""
    return zlib.crc32(str(value).encode("utf-8")) % buckets


class FeatureSpec(BaseModel):
    """One feature: where its value is in the record, what type it has, and its bad-value policies."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    #: Dotted path in the record; the name when not given.
    path: str | None = Field(None, min_length=1)
    type: FeatureType = "numeric"
    vocabulary: list[str | int] | None = None
    buckets: int | None = Field(None, ge=2)
    missing: Policy = "mask"
    malformed: Policy = "dead_letter"
    default: float | int | str | bool | None = None
    _index: dict[tuple[_Type, str | int], int] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> FeatureSpec:
        if self.type == "categorical":
            if not self.vocabulary or len(self.vocabulary) < 2:
                raise ValueError(f"feature {self.name!r}: a categorical feature needs a vocabulary of >= 2")
            if any(isinstance(v, bool) for v in self.vocabulary) or len(set(self.vocabulary)) != len(
                self.vocabulary
            ):
                raise ValueError(
                    f"feature {self.name!r}: vocabulary values must be distinct strings or integers"
                )
        elif self.vocabulary is not None:
            raise ValueError(f"feature {self.name!r}: vocabulary applies only to type categorical")
        if self.type == "hashed" and self.buckets is None:
            raise ValueError(f"feature {self.name!r}: a hashed feature needs buckets (>= 2)")
        if self.type != "hashed" and self.buckets is not None:
            raise ValueError(f"feature {self.name!r}: buckets applies only to type hashed")
        uses_default = "default" in (self.missing, self.malformed)
        if uses_default and self.default is None:
            raise ValueError(f"feature {self.name!r}: policy 'default' needs a default value")
        if not uses_default and self.default is not None:
            raise ValueError(
                f"feature {self.name!r}: default applies only with missing or malformed: default"
            )
        if uses_default and self.default_code() is None:
            raise ValueError(
                f"feature {self.name!r}: default {self.default!r} is not a valid {self.type} value"
            )
        return self

    @property
    def source(self) -> str:
        """The dotted path of the value in a record."""
        return self.path or self.name

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.source.split("."))

    @property
    def categories(self) -> int:
        """Classes of a categorical or hashed feature (0 for the others)."""
        if self.type == "categorical":
            return len(self.vocabulary or ())
        return self.buckets or 0 if self.type == "hashed" else 0

    def code(self, value: Any) -> tuple[int, float]:
        """(status, column value) of one raw value: the reference conversion both decoders match."""
        if value is None:
            return MISSING, math.nan
        kind = type(value)
        if self.type == "numeric":
            if kind is not int and kind is not float:
                return WRONG_TYPE, math.nan
            number = as_float(value)
            return (NON_FINITE, math.nan) if not abs(number) <= _FLOAT32_MAX else (OK, number)
        if self.type == "binary":
            if kind is bool:
                return OK, float(value)
            if kind is int or kind is float:
                return (OK, float(value)) if value in (0, 1) else (OUT_OF_RANGE, math.nan)
            return WRONG_TYPE, math.nan
        if self.type == "count":
            if kind is int or (kind is float and math.isfinite(value) and value == math.floor(value)):
                number = as_float(value)
                if number < 0 or number > _FLOAT32_MAX:
                    return OUT_OF_RANGE, math.nan
                return OK, number
            return (OUT_OF_RANGE, math.nan) if kind is float else (WRONG_TYPE, math.nan)
        if kind is not str and kind is not int:
            return WRONG_TYPE, math.nan
        if self.type == "hashed":
            return OK, float(hash_bucket(value, self.buckets or 2))
        index = self.index_of().get((kind, value))
        return (UNKNOWN_CATEGORY, math.nan) if index is None else (OK, float(index))

    def index_of(self) -> dict[tuple[_Type, str | int], int]:
        """Vocabulary value -> index, keyed by (type, value) so 1 and "1" (and true) stay apart."""
        if self._index is None:
            self._index = {(type(v), v): i for i, v in enumerate(self.vocabulary or ())}
        return self._index

    def default_code(self) -> float | None:
        """The column value of the default, or None when it is not a valid value of the type."""
        status, value = self.code(self.default)
        return value if status == OK else None


@dataclass(frozen=True)
class FeatureLayout:
    """Where each feature type lives in the model vector, the encoder input and the decoder output.

    The model vector has one column per feature, in schema order (a categorical's column holds its
    index). The decoder output is laid out by type: numeric locations, binary logits, count
    log-rates, then each categorical's logits.
    """

    features: tuple[FeatureSpec, ...]

    def columns(self, kind: FeatureType) -> list[int]:
        return [i for i, f in enumerate(self.features) if f.type == kind]

    @property
    def numeric(self) -> list[int]:
        return self.columns("numeric")

    @property
    def binary(self) -> list[int]:
        return self.columns("binary")

    @property
    def count(self) -> list[int]:
        return self.columns("count")

    @property
    def categorical(self) -> list[tuple[int, int]]:
        """(column, classes) of each categorical or hashed feature."""
        return [(i, f.categories) for i, f in enumerate(self.features) if f.categories]

    @property
    def dim(self) -> int:
        return len(self.features)

    @property
    def param_size(self) -> int:
        """Decoder outputs: one per numeric, binary and count feature, one per class of the others."""
        return len(self.numeric) + len(self.binary) + len(self.count) + sum(k for _, k in self.categorical)

    @property
    def encoder_width(self) -> int:
        """Encoder inputs: the decoder's layout of values (one-hot classes) plus the observed mask."""
        return self.param_size + self.dim


_FEATURES = TypeAdapter(list[FeatureSpec])


def read_features(value: Any) -> Any:
    """``input.features`` as given: a list of features, or the path of a YAML/JSON file holding one
    (or a mapping with a ``features`` list). Errors name the file."""
    if not isinstance(value, str | Path):
        return value
    path = Path(value)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"input.features file {path}: {exc.strerror or exc}") from None
    try:
        data = orjson.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"input.features file {path}: cannot parse: {exc}") from None
    if isinstance(data, dict) and "features" in data:
        data = data["features"]
    if isinstance(data, dict) and isinstance(data.get("input"), dict):
        data = data["input"].get("features")
    if not isinstance(data, list):
        raise ValueError(f"input.features file {path}: expected a list of features")
    try:
        return [spec.model_dump(exclude_none=True) for spec in _FEATURES.validate_python(data)]
    except ValidationError as exc:
        raise ValueError(f"input.features file {path}: {exc}") from None


def check_features(features: Sequence[FeatureSpec]) -> None:
    """Names and paths must be unique, and no path may run through another feature's value."""
    if not features:
        raise ValueError("input.features: give at least one feature")
    names = [f.name for f in features]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"input.features: duplicate feature names {duplicates}")
    paths = {f.source: f.name for f in features}
    for feature in features:
        keys = feature.keys
        if any(not key for key in keys):
            raise ValueError(f"input.features {feature.name!r}: path {feature.source!r} has an empty segment")
        for depth in range(1, len(keys)):
            prefix = ".".join(keys[:depth])
            if prefix in paths:
                raise ValueError(
                    f"input.features {feature.name!r}: path {feature.source!r} runs through "
                    f"feature {paths[prefix]!r} ({prefix!r})"
                )


def check_input_settings(settings: Any) -> None:
    """The ``input`` settings around a feature schema agree (ValueError naming the setting).

    ``settings`` is an ``InputSettings`` with ``features`` given; an Avro schema is read and every
    feature's path must name one of its fields.
    """
    features: list[FeatureSpec] = settings.features
    check_features(features)
    if settings.dim != len(features):
        raise ValueError(
            f"input.dim={settings.dim} but input.features has {len(features)} features; "
            "leave input.dim out (it is the number of features)"
        )
    if settings.context_dim:
        raise ValueError("input.context_dim must be 0 with input.features (a schema has no context vector)")
    if settings.format == "f32":
        raise ValueError("input.format=f32 has no named fields: input.features needs json or avro")
    if settings.format == "avro":
        from streamvi.features.avro import AvroReader, check_paths

        if (settings.avro_schema is None) == (not settings.avro_schema_ids):
            raise ValueError(
                "input.format=avro needs exactly one of input.avro_schema (records without a header) "
                "and input.avro_schema_ids (Confluent wire format)"
            )
        check_paths(AvroReader(settings.avro_schema, settings.avro_schema_ids).schemas(), features)
