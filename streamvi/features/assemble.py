"""Whole-fetch assembly: parsed events to the model vector and its observed mask, column by column.

Each feature's values are gathered from every document of the fetch in one pass, then typed,
range-checked and converted as numpy arrays: a block of same-type columns at a time when they hold
only plain values (:mod:`streamvi.features.blocks`), otherwise per column here, with type codes
compared as arrays. Missing or malformed values follow the feature's
policy: NaN (masked, so left out of the likelihood), the default, or a dead letter (the first such
feature in schema order names the reason). :mod:`streamvi.features.reference` decodes one record
at a time the plain way; the tests hold the two to the same output on every record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import repeat
from operator import is_not
from typing import Any

import numpy as np

from streamvi.features.blocks import Block, Given, LabelColumns, binary_block, count_block, numeric_block
from streamvi.features.gather import Column
from streamvi.features.schema import (
    MISSING,
    NON_FINITE,
    OK,
    OUT_OF_RANGE,
    UNKNOWN_CATEGORY,
    WRONG_TYPE,
    FeatureSpec,
    as_float,
    hash_bucket,
)
from streamvi.features.values import feature_error
from streamvi.io.codecs import DecodeError

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NUMBERS = frozenset({int, float})


def _floats(values: list[Any]) -> np.ndarray:
    """Numbers to float64 in one call; integers beyond a double's range become infinite."""
    try:
        return np.array(values, dtype=np.float64)
    except OverflowError:
        return np.array([as_float(v) for v in values], dtype=np.float64)


#: Type codes of JSON (and Avro) values, compared as arrays.
NONE, BOOL, INT, FLOAT, STR, OTHER = range(6)
_TYPE_CODES: dict[type, int] = {type(None): NONE, bool: BOOL, int: INT, float: FLOAT, str: STR}


def _types(values: list[Any]) -> np.ndarray:
    """The type code of every value, int8 [n]."""
    codes = _TYPE_CODES.get
    return np.fromiter((codes(type(v), OTHER) for v in values), dtype=np.int8, count=len(values))


def _numeric(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    kinds = set(map(type, values))
    column = np.full(len(values), np.nan)
    status = np.full(len(values), WRONG_TYPE, dtype=np.int8)
    if kinds <= _NUMBERS:
        number = np.ones(len(values), dtype=bool)
        column = _floats(values)
    else:
        types = _types(values)
        number = (types == INT) | (types == FLOAT)
        status[types == NONE] = MISSING
        if number.any():
            column[number] = _floats([v for v, ok in zip(values, number, strict=True) if ok])
    with np.errstate(invalid="ignore"):
        finite = np.abs(column) <= _FLOAT32_MAX
    status[number] = np.where(finite[number], OK, NON_FINITE)
    return column, status


def _binary(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    types = _types(values)
    column = np.full(len(values), np.nan)
    status = np.full(len(values), WRONG_TYPE, dtype=np.int8)
    status[types == NONE] = MISSING
    flags = types == BOOL
    column[flags] = [float(v) for v, ok in zip(values, flags, strict=True) if ok]
    status[flags] = OK
    number = (types == INT) | (types == FLOAT)
    if number.any():
        numbers = _floats([v for v, ok in zip(values, number, strict=True) if ok])
        column[number] = np.where((numbers == 0) | (numbers == 1), numbers, np.nan)
        status[number] = np.where(np.isnan(column[number]), OUT_OF_RANGE, OK)
    return column, status


def _count(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    types = _types(values)
    column = np.full(len(values), np.nan)
    status = np.full(len(values), WRONG_TYPE, dtype=np.int8)
    status[types == NONE] = MISSING
    number = (types == INT) | (types == FLOAT)
    if number.any():
        numbers = _floats([v for v, ok in zip(values, number, strict=True) if ok])
        with np.errstate(invalid="ignore"):
            good = (numbers >= 0) & (numbers <= _FLOAT32_MAX) & (np.floor(numbers) == numbers)
        column[number] = np.where(good, numbers, np.nan)
        status[number] = np.where(good, OK, OUT_OF_RANGE)
    return column, status


def _category(feature: FeatureSpec, values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    types = _types(values)
    status = np.full(len(values), WRONG_TYPE, dtype=np.int8)
    status[types == NONE] = MISSING
    usable = (types == STR) | (types == INT)
    if feature.type == "hashed":
        buckets = feature.buckets or 2
        codes = [hash_bucket(v, buckets) if ok else -1 for v, ok in zip(values, usable, strict=True)]
    else:
        index = feature.index_of()
        codes = [index.get((type(v), v), -1) if ok else -1 for v, ok in zip(values, usable, strict=True)]
    column = np.asarray(codes, dtype=np.float64)
    status[usable] = np.where(column[usable] >= 0, OK, UNKNOWN_CATEGORY)
    column[column < 0] = np.nan
    return column, status


def convert(feature: FeatureSpec, values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(column values as float64, NaN where bad; status codes) of one feature over a fetch."""
    if feature.type == "numeric":
        column, status = _numeric(values)
    elif feature.type == "binary":
        column, status = _binary(values)
    elif feature.type == "count":
        column, status = _count(values)
    else:
        column, status = _category(feature, values)
    column[status != OK] = np.nan
    return column, status


#: The block conversion of each feature type that has one.
_BLOCKS: dict[str, Callable[[Sequence[Column], Given | None], Block | None]] = {
    "numeric": numeric_block,
    "binary": binary_block,
    "count": count_block,
}


#: Reads the given numeric, binary or count columns as floats [k, n] with their nulls, or None
#: when their types are not known to be plain.
Floats = Callable[[list[int]], Given | None]


class _Picked(Sequence[Column]):
    """Some of the columns, in ``members`` order, each taken from ``columns`` only when used."""

    def __init__(self, columns: Sequence[Column], members: list[int]) -> None:
        self._columns = columns
        self._members = members

    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, r: Any) -> Any:
        return self._columns[self._members[r]]


class FeatureAssembler:
    """Turns the parsed documents of a fetch into the model vector, with masks and dead letters.

    Columns come from :mod:`streamvi.features.gather`; numeric, binary
    and count features are converted a block at a time and categorical ones a column at a time
    when they hold only plain values (:mod:`streamvi.features.blocks`), the others by
    :func:`convert`.
    """

    def __init__(self, features: Sequence[FeatureSpec]) -> None:
        self.features = tuple(features)
        self.dim = len(self.features)
        self._defaults = [f.default_code() if f.default is not None else None for f in self.features]
        self._labels = LabelColumns(self.features)
        members = {kind: [j for j, f in enumerate(self.features) if f.type == kind] for kind in _BLOCKS}
        self._blocks = [(columns, _BLOCKS[kind]) for kind, columns in members.items() if columns]

    def assemble(
        self, columns: Sequence[Column], errors: list[DecodeError | None], floats: Floats | None = None
    ) -> np.ndarray:
        """The [n, dim] float32 vector from each feature's column of raw values (NaN = not
        observed); the first feature a record must be dead-lettered for sets its entry of
        ``errors`` (already-set ones are kept). ``floats``, when given, reads numeric, binary and
        count columns known to hold only their plain types straight into float arrays, and
        ``columns`` is then asked only for the columns still needed."""
        n = len(errors)
        rows = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return rows
        pending: list[tuple[int, np.ndarray, np.ndarray]] = []
        for members, values, status in self._converted(columns, floats):
            if status is not None:
                values = np.where(status == OK, values, np.nan)
                pending += self._needing_policy(members, values, status)
            rows[:, members] = values.T
        if pending:
            dead = np.fromiter(map(is_not, errors, repeat(None)), dtype=bool, count=n)
            for j, values, status in sorted(pending, key=lambda item: item[0]):
                rows[:, j] = self._apply_policies(j, values, status, columns[j], errors, dead)
        return rows

    def _converted(
        self, columns: Sequence[Column], floats: Floats | None
    ) -> list[tuple[list[int], np.ndarray, np.ndarray | None]]:
        """(features, their values [k, n], status or None when all OK) of every feature: the plain
        blocks, then each feature of a block that was not plain, converted alone."""
        out: list[tuple[list[int], np.ndarray, np.ndarray | None]] = []
        left: list[int] = []
        for members, block in self._blocks:
            given = None if floats is None else floats(members)
            converted = block(_Picked(columns, members), given)
            if converted is None:
                left += members
            else:
                out.append((members, *converted))
        left += [j for j, f in enumerate(self.features) if f.categories]
        for j in left:
            feature = self.features[j]
            if feature.categories:
                one = self._labels.convert(j, feature, columns[j])
            else:  # its block holds another type somewhere: this column alone may still be plain
                one = _BLOCKS[feature.type]([columns[j]], None if floats is None else floats([j]))
            if one is None:
                values, status = convert(feature, list(columns[j]))
                one = values[None], status[None]
            out.append(([j], *one))
        return out

    def _needing_policy(
        self, members: list[int], values: np.ndarray, status: np.ndarray
    ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(feature, values, status) of the block's features with bad values that are not simply
        masked (their NaN already masks them)."""
        missing = (status == MISSING).any(axis=1).tolist()
        malformed = ((status != OK) & (status != MISSING)).any(axis=1).tolist()
        out = []
        for r, j in enumerate(members):
            feature = self.features[j]
            if (missing[r] and feature.missing != "mask") or (malformed[r] and feature.malformed != "mask"):
                out.append((j, values[r], status[r]))
        return out

    def _apply_policies(
        self,
        j: int,
        values: np.ndarray,
        status: np.ndarray,
        column: Column,
        errors: list[DecodeError | None],
        dead: np.ndarray,
    ) -> np.ndarray:
        """The feature's column (NaN where bad) with its bad values defaulted or dead-lettered."""
        feature = self.features[j]
        missing = status == MISSING
        malformed = (status != OK) & ~missing
        for policy, which in ((feature.missing, missing), (feature.malformed, malformed)):
            if not which.any():
                continue
            if policy == "default":
                values[which] = self._defaults[j]
            elif policy == "dead_letter":
                for i in np.flatnonzero(which & ~dead).tolist():
                    errors[i] = feature_error(feature, int(status[i]), column[i])
                dead |= which
        return values
