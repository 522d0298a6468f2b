"""The record decoder under a feature schema: JSON or Avro events to the model vector and its mask.

It has the interface of :class:`streamvi.io.codecs.RecordDecoder` (``dim``, ``context_dim``,
``decode_many``), so the stream path takes either. Rows hold NaN where a value is not observed;
``DecodedBatch.observed`` is the same mask as booleans. A JSON fetch is first decoded typed
(:mod:`streamvi.features.typed`: only the schema's fields, no dicts); a fetch with any value that
does not decode that way takes the general path, orjson and the extractor, record by record where
it must, so every dead letter has the general path's reason and message. An Avro fetch is read
column by column per writer schema (:mod:`streamvi.features.avro_columns`); the values it does not
read, or rejects, go through fastavro one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from streamvi.features.assemble import FeatureAssembler, Floats
from streamvi.features.avro import AvroReader
from streamvi.features.avro_columns import ColumnarAvro, Leaf, LeafColumns, columnar_reader, read_fetch
from streamvi.features.gather import Column, columns_of, compile_extractor
from streamvi.features.schema import FeatureSpec
from streamvi.features.typed import TypedJson
from streamvi.io.base import RawRecord
from streamvi.io.codecs import DecodedBatch, DecodedRecord, DecodeError


def parse_json(value: bytes) -> dict[str, Any]:
    """A JSON object, or the DecodeError saying why not (the same reasons as the vector codec)."""
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("wrong_encoding", "the value is not valid UTF-8") from None
        raise DecodeError("invalid_json", str(exc)) from None
    if type(document) is not dict:
        raise DecodeError("not_an_object", f"expected a JSON object, got {type(document).__name__}")
    return document


def record_id_of(document: dict[str, Any]) -> str | None:
    """The ``id`` field: a string, or an integer taken as its decimal string; DecodeError otherwise."""
    record_id = document.get("id")
    if record_id is None or type(record_id) is str:
        return record_id
    if type(record_id) is int:
        return str(record_id)
    raise DecodeError("wrong_type", f"'id' must be a string or an integer, got {type(record_id).__name__}")


#: Vectors [n, dim], record ids and dead letters of a fetch.
_Decoded = tuple[np.ndarray, list[str | None], list[DecodeError | None]]
#: Types of ``id`` fields taken as they are.
_PLAIN_IDS = frozenset({str, type(None)})


class FeatureDecoder:
    """Decodes a fetch of events (``json`` or ``avro``) into the schema's model vectors at once."""

    #: Latents messages say how many dimensions of each record were observed.
    reports_observed = True
    context_dim = 0

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        fmt: str = "json",
        max_bytes: int = 1 << 20,
        avro_schema: Path | None = None,
        avro_schema_ids: dict[int, Path] | None = None,
    ) -> None:
        if fmt not in ("json", "avro"):
            raise ValueError(f"input.format={fmt} has no named fields for input.features (use json or avro)")
        self.format = fmt
        self.features = tuple(features)
        self.dim = len(self.features)
        self.max_bytes = max_bytes
        self.assembler = FeatureAssembler(self.features)
        self._extract = compile_extractor([f.keys for f in self.features])
        self.avro = AvroReader(avro_schema, avro_schema_ids or {}) if fmt == "avro" else None
        typed = fmt == "json" and TypedJson.supports(self.features)
        self._typed = TypedJson(self.features) if typed else None
        self._paths = [("id",), *(f.keys for f in self.features)]
        self._columnar = self._columnar_readers() if self.avro is not None else None

    def _columnar_readers(self) -> dict[int | None, ColumnarAvro | None] | None:
        """The columnar reader of each Avro schema (by wire-header id, None without a header), or
        None when it reads none of them."""
        assert self.avro is not None
        schemas: dict[int | None, dict[str, Any]] = {}
        if self.avro.schema is not None:
            schemas[None] = self.avro.schema
        schemas.update(self.avro.by_id.items())
        readers = {key: columnar_reader(schema, self._paths) for key, schema in schemas.items()}
        return readers if any(r is not None for r in readers.values()) else None

    def parse(self, value: bytes | None) -> dict[str, Any]:
        """One record value to its document (DecodeError when it cannot be one)."""
        if not value:
            raise DecodeError("empty_value", "the record has no value")
        if len(value) > self.max_bytes:
            raise DecodeError(
                "oversize", f"{len(value)} bytes exceeds input.max_record_bytes={self.max_bytes}"
            )
        if self.avro is None:
            return parse_json(value)
        document = self.avro.read(value)
        if type(document) is not dict:
            raise DecodeError("not_an_object", f"expected an Avro record, got {type(document).__name__}")
        return document

    def decode_many(self, records: Sequence[RawRecord]) -> DecodedBatch:
        """Decode a fetch: parse and extract each value, then convert every feature column."""
        n = len(records)
        values = [record.value for record in records]
        x, record_ids, errors = self._decode(values)
        if None in record_ids:
            for i, record in enumerate(records):
                if errors[i] is None and record_ids[i] is None and record.key is not None:
                    record_ids[i] = record.key.decode("utf-8", errors="replace")
        observed = ~np.isnan(x)
        return DecodedBatch(x, np.zeros((n, 0), dtype=np.float32), record_ids, errors, observed)

    def _decode(self, values: list[bytes | None]) -> _Decoded:
        """The fetch in parts: those a typed reader reads (the columnar Avro reader, a group per
        schema, or typed JSON), then the rest through the general path; each part assembled on its
        own, as a record's vector depends on that record alone."""
        if self._columnar is not None:
            groups, rest = read_fetch(self._columnar, values, self._paths, self.max_bytes)
            parts = [(indices, self._read_leaves(leaves)) for indices, leaves in groups]
        elif self._typed is not None:
            typed, rest = self._typed.decode(values, self.max_bytes)
            parts = [(np.asarray(indices), self._read_structs(structs)) for indices, structs in typed]
        else:
            return self._general(values)
        if not parts:
            return self._general(values)
        if not rest and len(parts) == 1:
            return parts[0][1]  # one part of every value, in order
        n = len(values)
        x = np.empty((n, self.dim), dtype=np.float32)
        record_ids: list[str | None] = [None] * n
        errors: list[DecodeError | None] = [None] * n
        if rest:
            parts.append((np.asarray(rest), self._general([values[i] for i in rest])))
        for indices, (part_x, part_ids, part_errors) in parts:
            x[indices] = part_x
            for i, record_id, error in zip(indices.tolist(), part_ids, part_errors, strict=True):
                record_ids[i], errors[i] = record_id, error
        return x, record_ids, errors

    def _general(self, values: list[bytes | None]) -> _Decoded:
        """Parse (orjson or fastavro) and extract each value, then assemble."""
        errors: list[DecodeError | None] = [None] * len(values)
        raw = self._columns(values, errors)
        return self._finish(raw[0], raw[1:], errors)

    def _finish(
        self,
        ids: Column,
        columns: Sequence[Column],
        errors: list[DecodeError | None],
        floats: Floats | None = None,
    ) -> _Decoded:
        """(vectors, ids, errors) from the ``id`` column and the feature columns."""
        record_ids = self._record_ids(ids, errors)
        return self.assembler.assemble(columns, errors, floats), record_ids, errors

    def _read_leaves(self, leaves: list[Leaf]) -> _Decoded:
        """(vectors, ids, errors) of a group read by the columnar reader (the ``id`` leaf first)."""
        columns = LeafColumns(leaves[1:], [f.type for f in self.features])
        return self._finish(leaves[0].python(), columns, [None] * len(leaves[0].nulls), columns.floats)

    def _read_structs(self, structs: list[Any]) -> _Decoded:
        """(vectors, ids, errors) of the values decoded typed."""
        assert self._typed is not None
        columns = self._typed.columns(structs)
        return self._finish(self._typed.ids(structs), columns, [None] * len(structs), columns.floats)

    def _columns(self, values: list[bytes | None], errors: list[DecodeError | None]) -> list[Column]:
        """The ``id`` column, then each feature's column of raw values (records with an error in
        ``errors`` get None throughout). A JSON fetch whose values all have a usable size is parsed
        and extracted in one C-level ``map`` pipeline, each document freed once its values are out;
        a fetch with any bad value is parsed again value by value to find which. (Joining the
        values into one JSON array and parsing once would be unsound: values that are not JSON
        alone, such as ``{"a":1},{"b":2}``, ``{"x":[{}`` and ``{}]}``, join into an array of one
        object per value.)"""
        width = self.dim + 1
        if self.avro is None and values and None not in values:
            sizes = list(map(len, values))  # type: ignore[arg-type]
            if min(sizes) > 0 and max(sizes) <= self.max_bytes:
                try:
                    return columns_of(list(map(self._extract, map(orjson.loads, values))), width)  # type: ignore[arg-type]
                except (orjson.JSONDecodeError, AttributeError):  # not JSON, or not an object
                    pass
        rows: list[tuple[Any, ...]] = []
        for i, value in enumerate(values):
            try:
                rows.append(self._extract(self.parse(value)))
            except DecodeError as error:
                errors[i] = error
                rows.append(self._extract({}))
        return columns_of(rows, width)

    @staticmethod
    def _record_ids(ids: Column, errors: list[DecodeError | None]) -> list[str | None]:
        """The ``id`` of every record (str); a bad one dead-letters its record."""
        if set(map(type, ids)) <= _PLAIN_IDS:
            return list(ids)
        record_ids: list[str | None] = [None] * len(ids)
        for i, record_id in enumerate(ids):
            if errors[i] is not None:
                continue
            try:
                record_ids[i] = record_id_of({"id": record_id})
            except DecodeError as error:
                errors[i] = error
        return record_ids

    def decode(self, record: RawRecord) -> DecodedRecord:
        """One record (raises DecodeError); the same checks as ``decode_many``."""
        batch = self.decode_many([record])
        error = batch.errors[0]
        if error is not None:
            raise error
        return DecodedRecord(batch.x[0], batch.c[0], batch.record_ids[0])
