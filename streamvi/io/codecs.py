"""Record codecs: input bytes to validated vectors (or a dead-letter reason), outputs to bytes.

Input formats (``input.format``):
- ``json``: ``{"id": str?, "x": [float, ...], "c": [float, ...]?}``; other fields are ignored;
  ``c`` (the conditioning context, ``input.context_dim`` values) is required when context_dim > 0;
- ``f32``: the raw little-endian float32 vector of ``input.dim`` values, followed by the
  ``input.context_dim`` context values when there is a context.
A record that fails any check raises :class:`DecodeError` with a stable ``reason`` label; that
includes x values outside the support of ``model.likelihood`` (see :class:`Support`).

``RecordDecoder.decode_many`` decodes a whole fetch into one array: f32 with one ``frombuffer``
over the joined values, JSON with simdjson straight into the row (no Python object per number).
Any record the fast JSON path cannot take whole goes through the reference decoder (orjson), which
also names the reason of every bad record, so both paths accept and reject the same records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import orjson
import simdjson

from streamvi.errors import StreamVIError
from streamvi.io.base import Headers, OutputMessage, RawRecord

#: Every reason a record can be dead-lettered for; the ``reason`` label of the counter.
DEAD_LETTER_REASONS = (
    "empty_value",
    "oversize",
    "wrong_encoding",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "wrong_length",
    "non_finite",
    "missing_context",
    "out_of_range",
    "unknown_category",
    "schema_mismatch",
    "unknown_schema",
)

HEADER_REASON = "streamvi.error.reason"
HEADER_DETAIL = "streamvi.error.detail"
HEADER_TOPIC = "streamvi.source.topic"
HEADER_PARTITION = "streamvi.source.partition"
HEADER_OFFSET = "streamvi.source.offset"


class DecodeError(StreamVIError):
    """A record cannot be used; ``reason`` is one of DEAD_LETTER_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    """A valid input: x (in the support) and context c (float32, finite, right lengths) and its id."""

    x: np.ndarray
    c: np.ndarray
    record_id: str | None


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A fetch decoded at once: row i of ``x``/``c`` holds record i unless ``errors[i]`` says why not."""

    x: np.ndarray
    c: np.ndarray
    record_ids: list[str | None]
    errors: list[DecodeError | None]
    #: Under a feature schema, True where a value was observed (x holds NaN elsewhere); None when
    #: every value is observed (model-ready vectors).
    observed: np.ndarray | None = None

    @property
    def all_valid(self) -> bool:
        return not any(self.errors)


SupportKind = Literal["real", "unit_interval", "count", "bounded_count"]

#: The values x may take under each ``model.likelihood``: the one place this mapping lives.
_LIKELIHOOD_SUPPORT: dict[str, SupportKind] = {
    "bernoulli": "unit_interval",
    "continuous_bernoulli": "unit_interval",
    "gaussian": "real",
    "poisson": "count",
    "binomial": "bounded_count",
}
_SUPPORT_NEEDS: dict[SupportKind, str] = {
    "real": "finite values",
    "unit_interval": "values in [0, 1]",
    "count": "non-negative integer counts",
    "bounded_count": "integer counts in [0, {upper}]",
}


@dataclass(frozen=True, slots=True)
class Support:
    """The set x values must lie in for the likelihood to be a density there; ``origin`` names the
    setting that chose it, for error messages. ``upper`` is the largest count of a bounded count."""

    kind: SupportKind = "real"
    origin: str = "the input"
    upper: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "bounded_count" and (self.upper is None or self.upper < 1):
            raise ValueError(f"a bounded count needs an upper bound of at least 1, got {self.upper}")
        if self.kind != "bounded_count" and self.upper is not None:
            raise ValueError(f"a {self.kind} support has no upper bound")

    @classmethod
    def of_likelihood(cls, likelihood: str, total_count: int | None = None) -> Support:
        """The support of a ``model.likelihood`` value; ``total_count`` (``model.binomial_total_count``)
        bounds the binomial's counts and is ignored by the other likelihoods, as the setting is."""
        try:
            kind = _LIKELIHOOD_SUPPORT[likelihood]
        except KeyError:
            raise ValueError(f"unknown model.likelihood {likelihood!r}") from None
        if kind != "bounded_count":
            return cls(kind, f"model.likelihood={likelihood}")
        if total_count is None:
            raise ValueError(f"model.likelihood={likelihood} needs model.binomial_total_count")
        return cls(kind, f"model.likelihood={likelihood}", total_count)

    @property
    def requirement(self) -> str:
        """The constraint in words, e.g. "model.likelihood=poisson needs non-negative integer counts"."""
        return f"{self.origin} needs {_SUPPORT_NEEDS[self.kind].format(upper=self.upper)}"

    def outside(self, x: np.ndarray) -> np.ndarray | None:
        """Element mask of the values of ``x`` outside the support, for finite ``x`` (callers check
        finiteness first); None when no finite value can be outside."""
        if self.kind == "real":
            return None
        with np.errstate(invalid="ignore"):
            if self.kind == "unit_interval":
                return (x < 0) | (x > 1)
            outside = (x < 0) | (np.floor(x) != x)
            return outside if self.upper is None else outside | (x > self.upper)

    def first_violation(self, x: np.ndarray) -> tuple[int, int, float] | None:
        """(row, index, value) of the first value of the 2-D ``x`` that is not finite or lies
        outside the support, or None when every value is fine."""
        bad = ~np.isfinite(x)
        outside = self.outside(x)
        if outside is not None:
            bad |= outside
        if not bad.any():
            return None
        row, index = (int(i) for i in np.argwhere(bad)[0])
        return row, index, float(x[row, index])

    def violation_detail(self, index: int, value: float) -> str:
        """What an out-of-range value breaks, e.g. "x[3] = 2.5: model.likelihood=poisson needs ..."."""
        return f"x[{index}] = {np.float32(value)!s}: {self.requirement}"


#: Every x value is accepted as long as it is finite (the Gaussian likelihood).
REAL_LINE = Support()


class BatchDecoder(Protocol):
    """What the stream path needs of an input decoder: widths and whole-fetch decoding."""

    dim: int
    context_dim: int
    #: True when rows may hold NaN (not observed) and the latents say how much was observed.
    reports_observed: bool

    def decode_many(self, records: Sequence[RawRecord]) -> DecodedBatch: ...


class _NotFast(Exception):
    """The fast JSON path cannot decode this record whole; the reference decoder decides."""


class RecordDecoder:
    """Validates and decodes raw record values of one configured format and dimension, with x
    inside ``support`` (the real line unless the likelihood needs less)."""

    #: Model-ready vectors are observed whole; the latents do not say how much was observed.
    reports_observed = False

    def __init__(
        self, fmt: str, dim: int, max_bytes: int, context_dim: int = 0, support: Support = REAL_LINE
    ) -> None:
        if fmt not in ("json", "f32"):
            raise ValueError(f"unknown input format {fmt!r}")
        self.format = fmt
        self.dim = dim
        self.context_dim = context_dim
        self.support = support
        self.max_bytes = max_bytes
        self._no_context = np.zeros(0, dtype=np.float32)
        self._parser = simdjson.Parser()
        # Brackets in a document the fast path takes: the x array and, with a context, the c array.
        self._brackets = 2 if context_dim else 1

    def decode(self, record: RawRecord) -> DecodedRecord:
        """Decode one record (raises DecodeError); the same checks as ``decode_many``."""
        batch = self.decode_many([record])
        error = batch.errors[0]
        if error is not None:
            raise error
        return DecodedRecord(batch.x[0], batch.c[0], batch.record_ids[0])

    def decode_many(self, records: Sequence[RawRecord]) -> DecodedBatch:
        """Decode a fetch into one (n, dim) array; a bad record gets its DecodeError, not a row."""
        n = len(records)
        width = self.dim + self.context_dim
        errors: list[DecodeError | None] = [self._check_size(r.value) for r in records]
        record_ids: list[str | None] = [None] * n
        if self.format == "f32":
            rows = self._decode_f32_rows(records, errors, width)
        else:
            rows = np.zeros((n, width), dtype=np.float32)
            for i, record in enumerate(records):
                if errors[i] is None:
                    try:
                        record_ids[i] = self._decode_json_into(record.value or b"", rows[i])
                    except DecodeError as error:
                        errors[i] = error
        finite = np.isfinite(rows).all(axis=1)
        outside = self.support.outside(rows[:, : self.dim])  # only x: the context has no support
        out_of_range = np.zeros(n, dtype=bool) if outside is None else np.asarray(outside.any(axis=1))
        for i, record in enumerate(records):
            if errors[i] is not None:
                continue
            if not finite[i]:
                errors[i] = DecodeError("non_finite", "the vector holds NaN or infinite values")
            elif outside is not None and out_of_range[i]:
                index = int(np.argmax(outside[i]))
                detail = self.support.violation_detail(index, float(rows[i, index]))
                errors[i] = DecodeError("out_of_range", detail)
            elif record_ids[i] is None and record.key is not None:
                record_ids[i] = record.key.decode("utf-8", errors="replace")
        return DecodedBatch(rows[:, : self.dim], rows[:, self.dim :], record_ids, errors)

    def _check_size(self, value: bytes | None) -> DecodeError | None:
        if not value:
            return DecodeError("empty_value", "the record has no value")
        if len(value) > self.max_bytes:
            limit = f"input.max_record_bytes={self.max_bytes}"
            return DecodeError("oversize", f"{len(value)} bytes exceeds {limit}")
        if self.format == "f32" and len(value) != 4 * (self.dim + self.context_dim):
            return DecodeError(
                "wrong_length",
                f"{len(value)} bytes, expected {4 * (self.dim + self.context_dim)} "
                f"({self.dim} + {self.context_dim} context float32)",
            )
        return None

    def _decode_f32_rows(
        self, records: Sequence[RawRecord], errors: list[DecodeError | None], width: int
    ) -> np.ndarray:
        """One frombuffer over the joined values (one copy); rows of bad records stay zero."""
        good = [i for i, error in enumerate(errors) if error is None]
        joined = b"".join([records[i].value or b"" for i in good])
        values = np.frombuffer(joined, dtype="<f4").reshape(len(good), width)
        if len(good) == len(records):
            return values.astype(np.float32, copy=False)
        rows = np.zeros((len(records), width), dtype=np.float32)
        rows[good] = values
        return rows

    def _decode_json_into(self, value: bytes, row: np.ndarray) -> str | None:
        """Fill ``row`` (x then c) from a JSON document and return its id; raise DecodeError if bad."""
        if value.count(b"[") == self._brackets:  # no nested or extra arrays: simdjson can take it
            try:
                return self._decode_json_fast(value, row)
            except _NotFast:
                pass
        x, c, record_id = self._decode_json(value)
        row[: self.dim] = x
        row[self.dim :] = c
        return record_id

    def _decode_json_fast(self, value: bytes, row: np.ndarray) -> str | None:
        """simdjson into ``row``, or _NotFast; every simdjson proxy is released before returning
        (the parser refuses to parse again while one is alive)."""
        document: Any = None
        array: Any = None
        arrays: list[simdjson.Array] = []
        try:
            try:
                document = self._parser.parse(value)
            except (ValueError, RuntimeError):
                raise _NotFast from None
            if not isinstance(document, simdjson.Object):
                raise _NotFast
            record_id = document.get("id")
            if not _valid_id(record_id):
                raise _NotFast
            for field, length in (("x", self.dim), ("c", self.context_dim)):
                if length:
                    array = document.get(field)
                    if not isinstance(array, simdjson.Array) or len(array) != length:
                        raise _NotFast
                    arrays.append(array)
            with np.errstate(over="ignore"):  # beyond float32 range becomes inf: non_finite
                try:
                    row[: self.dim] = np.frombuffer(arrays[0].as_buffer(of_type="d"), dtype=np.float64)
                    if self.context_dim:
                        row[self.dim :] = np.frombuffer(arrays[1].as_buffer(of_type="d"), dtype=np.float64)
                except (TypeError, ValueError):  # an element that is not a number
                    raise _NotFast from None
            return None if record_id is None else str(record_id)
        finally:
            arrays.clear()
            document = array = None  # release the proxies

    def _decode_json(self, value: bytes) -> tuple[np.ndarray, np.ndarray, str | None]:
        """The reference decoder: orjson and explicit checks, naming the reason of any bad record."""
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
        if "x" not in document:
            raise DecodeError("missing_field", "the object has no 'x' field")
        x = _as_vector(document["x"], "x")
        if x.shape[0] != self.dim:
            raise DecodeError("wrong_length", f"'x' has {x.shape[0]} values, expected input.dim={self.dim}")
        record_id = document.get("id")
        if not _valid_id(record_id):
            kind = type(record_id).__name__
            raise DecodeError("wrong_type", f"'id' must be a string or an integer, got {kind}")
        c = self._no_context
        if self.context_dim:
            if "c" not in document:
                raise DecodeError("missing_context", f"input.context_dim={self.context_dim} but no 'c' field")
            c = _as_vector(document["c"], "c")
            if c.shape[0] != self.context_dim:
                raise DecodeError(
                    "wrong_length",
                    f"'c' has {c.shape[0]} values, expected input.context_dim={self.context_dim}",
                )
        return x, c, None if record_id is None else str(record_id)


_NUMBER_TYPES = frozenset({int, float})


def _valid_id(record_id: Any) -> bool:
    """A record id is a string (or an integer, taken as its decimal string); true/false are not ids."""
    return record_id is None or isinstance(record_id, str) or type(record_id) is int


def _as_vector(values: Any, field: str) -> np.ndarray:
    if not isinstance(values, list):
        raise DecodeError("wrong_type", f"'{field}' must be an array of numbers, got {type(values).__name__}")
    # One C-level pass over the element types (bool is its own type, so true/false are rejected);
    # numpy alone would quietly turn "1" or true into numbers.
    kinds = set(map(type, values))
    if not kinds <= _NUMBER_TYPES:
        found = sorted(kind.__name__ for kind in kinds - _NUMBER_TYPES)
        raise DecodeError("wrong_type", f"'{field}' must hold only numbers, found {', '.join(found)}")
    try:
        with np.errstate(over="ignore"):
            return np.asarray(values, dtype=np.float32)
    except OverflowError:
        raise DecodeError("non_finite", f"'{field}' holds a value beyond float32 range") from None


def dead_letter_message(record: RawRecord, topic: str, error: DecodeError) -> OutputMessage:
    """The original bytes and headers of ``record``, plus headers saying why and where from."""
    headers: Headers = list(record.headers)
    headers += [
        (HEADER_REASON, error.reason.encode()),
        (HEADER_DETAIL, error.detail.encode("utf-8", errors="replace")[:1024]),
        (HEADER_TOPIC, record.topic.encode()),
        (HEADER_PARTITION, str(record.partition).encode()),
        (HEADER_OFFSET, str(record.offset).encode()),
    ]
    return OutputMessage(topic=topic, key=record.key, value=record.value or b"", headers=headers)


@dataclass(frozen=True)
class LatentAnomalyFields:
    """The anomaly fields of a batch's latents messages (streamvi/anomaly): each record's anomaly
    percentile (null while the reference is not calibrated), its flag and, when explained, its
    lowest-likelihood inputs (one JSON array per record)."""

    percentiles: np.ndarray | None
    flagged: np.ndarray
    explanations: Sequence[bytes] | None = None

    def fields(self, n: int) -> list[bytes]:
        """Per record, the bytes ``,"anomaly_percentile":...,"anomaly":...[,"explanation":[...]]``."""
        percentiles = [b"null"] * n if self.percentiles is None else _json_rows(self.percentiles[:n, None])
        flags = [b"true" if f else b"false" for f in self.flagged[:n].tolist()]
        out = [
            b',"anomaly_percentile":%s,"anomaly":%s' % (p, f) for p, f in zip(percentiles, flags, strict=True)
        ]
        if self.explanations is not None:
            out = [o + b',"explanation":' + e for o, e in zip(out, self.explanations, strict=True)]
        return out


def latent_messages(
    topic: str,
    records: Sequence[RawRecord],
    record_ids: Sequence[str | None],
    z_loc: np.ndarray,
    z_scale: np.ndarray,
    bound: np.ndarray,
    model_step: int,
    bound_name: str,
    snapshot: str | None = None,
    observed: np.ndarray | None = None,
    anomaly: LatentAnomalyFields | None = None,
) -> list[OutputMessage]:
    """One latents message per record, keyed like its input (DESIGN.md latents contract); an
    encoder replica adds ``snapshot``, the name of the snapshot whose parameters scored it.

    ``observed`` (under a feature schema) is the number of dimensions of each record that were
    observed: its bound is then a bound on the density of those dimensions alone.

    The numbers of the whole batch are serialised by three orjson calls over the arrays (non-finite
    values become null); each record's value is then one join of byte strings, with no Python
    object per number or per field.
    """
    n = len(records)
    if n == 0:
        return []
    means = _json_rows(z_loc[:n])
    scales = _json_rows(z_scale[:n])
    elbos = _json_rows(bound[:n, None])
    ids = [b"null" if i is None else orjson.dumps(i) for i in record_ids]
    middle = b',"model_step":' + orjson.dumps(model_step) + b',"bound":' + orjson.dumps(bound_name)
    if snapshot is not None:
        middle += b',"snapshot":' + orjson.dumps(snapshot)
    prefixes: dict[tuple[str, int], bytes] = {}  # the origin fields, per input partition
    tails = [b"}"] * n if observed is None else [b',"observed":%d}' % k for k in observed[:n].tolist()]
    if anomaly is not None:
        tails = [extra + tail for extra, tail in zip(anomaly.fields(n), tails, strict=True)]
    messages = []
    for i, record in enumerate(records):
        origin = (record.topic, record.partition)
        prefix = prefixes.get(origin)
        if prefix is None:
            prefix = b',"topic":%s,"partition":%d,"offset":' % (orjson.dumps(record.topic), record.partition)
            prefixes[origin] = prefix
        value = b"".join(
            (
                b'{"id":',
                ids[i],
                prefix,
                b"%d" % record.offset,
                middle,
                b',"z_mean":[',
                means[i],
                b'],"z_scale":[',
                scales[i],
                b'],"elbo":',
                elbos[i],
                tails[i],
            )
        )
        messages.append(OutputMessage(topic=topic, key=record.key, value=value))
    return messages


def _json_rows(rows: np.ndarray) -> list[bytes]:
    """The JSON numbers of each row of a 2-D float array, comma-separated, without brackets."""
    text = orjson.dumps(np.ascontiguousarray(rows, dtype=np.float32), option=orjson.OPT_SERIALIZE_NUMPY)
    return text[2:-2].split(b"],[")


def metrics_message(topic: str, payload: dict[str, Any]) -> OutputMessage:
    """A metrics-topic message; non-finite floats become null so the JSON stays valid."""
    clean = {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in payload.items()}
    clean.setdefault("timestamp", time.time())
    return OutputMessage(topic=topic, key=None, value=orjson.dumps(clean))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
