"""Vectorised conversion of feature columns that hold only the plain types of their feature.

A fetch of well-formed events gives columns of floats (numeric), bools (binary), ints (count) or
strings (categorical, hashed), with None where a value is absent or null. Such columns are checked
with one ``set(map(type, ...))`` and converted with one ``np.fromiter`` per block of same-type
features (None becomes NaN), so no Python code runs per value. Each function returns None when a
column holds any other type, and the caller falls back to the general per-column conversion in
:mod:`streamvi.features.assemble`; both follow ``FeatureSpec.code`` value for value. A fetch
decoded typed (:mod:`streamvi.features.typed`, :mod:`streamvi.features.avro_columns`) has its
types fixed already: its numeric, binary and count columns come in as floats, unchecked.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

from streamvi.features.schema import (
    MISSING,
    NON_FINITE,
    OK,
    OUT_OF_RANGE,
    UNKNOWN_CATEGORY,
    FeatureSpec,
    hash_bucket,
)

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NONE = type(None)
#: The types each kind of block converts without the general path.
_NUMERIC: frozenset[type] = frozenset({int, float, _NONE})
_BINARY: frozenset[type] = frozenset({bool, int, float, _NONE})
_COUNT: frozenset[type] = frozenset({int, float, _NONE})
_LABELS: frozenset[type] = frozenset({str, int, _NONE})
#: Distinct values a hashed feature remembers the bucket of, before it starts afresh.
HASH_MEMORY = 1 << 16

Block = tuple[np.ndarray, np.ndarray | None]
#: Columns already read as floats [k, n] by a typed decoder, and which entries are null (None:
#: exactly the NaN ones).
Given = tuple[np.ndarray, np.ndarray | None]


def _mark_nan(
    columns: Sequence[Sequence[Any]], values: np.ndarray, status: np.ndarray, other: int, given: Given | None
) -> None:
    """Give NaN entries of ``values`` [k, n] their status: MISSING where the value is None, ``other``
    where it is a NaN float (only Avro doubles can be). Only the NaN entries are looked at; values
    ``given`` read typed come with their nulls (None: every NaN is one, as in JSON)."""
    nan = np.isnan(values)
    if given is not None:
        nulls = nan if given[1] is None else given[1]
        status[nan] = other
        status[nan & nulls] = MISSING
        return
    rows, cells = np.nonzero(nan)
    if len(rows):
        nones = [columns[j][i] is None for j, i in zip(rows.tolist(), cells.tolist(), strict=True)]
        status[rows, cells] = np.where(nones, MISSING, other)


def _floats(columns: Sequence[Sequence[Any]], allowed: frozenset[type]) -> np.ndarray | None:
    """[k, n] float64 of the columns when they hold only ``allowed`` types, else None."""
    if not set(map(type, chain.from_iterable(columns))) <= allowed:
        return None
    size = sum(map(len, columns))
    try:  # fromiter skips np.array's shape discovery; it too turns None into NaN
        values = np.fromiter(chain.from_iterable(columns), dtype=np.float64, count=size)
    except OverflowError:  # an integer beyond a double: the general path makes it infinite
        return None
    return values.reshape(len(columns), size // len(columns))


def numeric_block(columns: Sequence[Sequence[Any]], given: Given | None = None) -> Block | None:
    """(values [k, n], status or None when all OK) of numeric columns of numbers and None.
    ``given``: the columns as floats already, from a typed decoder that fixed their types."""
    values = _floats(columns, _NUMERIC) if given is None else given[0]
    if values is None:
        return None
    with np.errstate(invalid="ignore"):
        finite = np.abs(values) <= _FLOAT32_MAX
    if finite.all():
        return values, None
    status = np.where(finite, OK, NON_FINITE).astype(np.int8)
    _mark_nan(columns, values, status, NON_FINITE, given)
    return values, status


def binary_block(columns: Sequence[Sequence[Any]], given: Given | None = None) -> Block | None:
    """Binary columns of bools, numbers and None: 0/1 (or false/true) is OK, other numbers not."""
    values = _floats(columns, _BINARY) if given is None else given[0]
    if values is None:
        return None
    good = (values == 0) | (values == 1)
    if good.all():
        return values, None
    status = np.where(good, OK, OUT_OF_RANGE).astype(np.int8)
    _mark_nan(columns, values, status, OUT_OF_RANGE, given)
    return values, status


def count_block(columns: Sequence[Sequence[Any]], given: Given | None = None) -> Block | None:
    """Count columns of numbers and None: non-negative whole numbers within float32 are OK."""
    values = _floats(columns, _COUNT) if given is None else given[0]
    if values is None:
        return None
    with np.errstate(invalid="ignore"):
        good = (values >= 0) & (values <= _FLOAT32_MAX) & (np.floor(values) == values)
    if good.all():
        return values, None
    status = np.where(good, OK, OUT_OF_RANGE).astype(np.int8)
    _mark_nan(columns, values, status, OUT_OF_RANGE, given)
    return values, status


class LabelColumns:
    """Categorical and hashed columns of strings, integers and None, looked up through C-level
    ``dict.get`` calls: one vocabulary dict per categorical feature, and per hashed feature a dict
    of the buckets of the values seen so far. Strings and integers never compare equal, and bools
    and floats (which equal integers) are not let in, so plain values can key these dicts."""

    def __init__(self, features: Sequence[FeatureSpec]) -> None:
        self._lookup: list[dict[Any, int]] = [
            {v: i for i, v in enumerate(f.vocabulary or ())} if f.type == "categorical" else {}
            for f in features
        ]

    def convert(self, j: int, feature: FeatureSpec, column: Sequence[Any]) -> Block | None:
        """(values [1, n], status or None when all OK) of the categorical or hashed column of the
        ``j``-th feature."""
        if not set(map(type, column)) <= _LABELS:
            return None
        lookup = self._lookup[j]
        values = np.array([list(map(lookup.get, column))], dtype=np.float64)
        if feature.type == "hashed":
            self._hash_new(feature, column, values[0], lookup)
        nan = np.isnan(values)
        if not nan.any():
            return values, None
        status = np.zeros(values.shape, dtype=np.int8)
        _mark_nan([column], values, status, UNKNOWN_CATEGORY, None)
        return values, status

    @staticmethod
    def _hash_new(
        feature: FeatureSpec, column: Sequence[Any], values: np.ndarray, seen: dict[Any, int]
    ) -> None:
        """Hash the values not seen before into their buckets (and remember them)."""
        if len(seen) > HASH_MEMORY:
            seen.clear()
        buckets = feature.buckets or 2
        for i in np.flatnonzero(np.isnan(values)).tolist():
            value = column[i]
            if value is not None:
                bucket = seen[value] = hash_bucket(value, buckets)
                values[i] = bucket
