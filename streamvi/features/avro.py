"""Avro record values (fastavro): a writer schema from a file, or the Confluent wire format.

Without a wire header each value is one Avro datum of ``input.avro_schema``. With it (``input.
avro_schema_ids``) a value is magic byte 0, a 4-byte big-endian schema id, then the datum of the
schema file that id maps to. A value that does not decode under its schema is a dead letter
(``schema_mismatch``) naming the field where decoding failed.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import fastavro
import orjson
from fastavro.schema import to_parsing_canonical_form

from streamvi.features.schema import FeatureSpec
from streamvi.io.codecs import DecodeError

MAGIC = 0
HEADER_BYTES = 5


def load_schema(path: Path) -> dict[str, Any]:
    """A parsed Avro writer schema from a ``.avsc`` (JSON) file; ValueError names the file."""
    try:
        raw = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ValueError(f"Avro schema {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"Avro schema {path}: not JSON: {exc}") from None
    try:
        parsed: Any = fastavro.parse_schema(raw)
    except Exception as exc:  # fastavro raises several types for a bad schema
        raise ValueError(f"Avro schema {path}: {exc}") from None
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise ValueError(f"Avro schema {path}: the top level must be a record")
    return parsed


def _record_of(schema: Any, named: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record schema a field type holds (directly, by name, or inside a union), if any."""
    if isinstance(schema, str):
        schema = named.get(schema, schema)
    if isinstance(schema, list):
        records = [r for r in (_record_of(s, named) for s in schema) if r is not None]
        return records[0] if len(records) == 1 else None
    if isinstance(schema, dict) and schema.get("type") == "record":
        return schema
    return None


def named_types(schema: Any, found: dict[str, Any]) -> dict[str, Any]:
    """Every named type (record, enum, fixed) defined in ``schema``, by name, added to ``found``."""
    if isinstance(schema, list):
        for item in schema:
            named_types(item, found)
    elif isinstance(schema, dict):
        if "name" in schema and schema.get("type") in ("record", "enum", "fixed"):
            found[schema["name"]] = schema
        for field in schema.get("fields", ()):
            named_types(field["type"], found)
        for key in ("items", "values"):
            if key in schema:
                named_types(schema[key], found)
    return found


def check_paths(schemas: list[tuple[str, dict[str, Any]]], features: list[FeatureSpec]) -> None:
    """Every feature's path must name a field (through nested records) of at least one of the
    schemas records may be written in; in the others the feature is missing."""
    for feature in features:
        problems = []
        for origin, schema in schemas:
            try:
                _check_path(schema, feature, origin)
            except ValueError as exc:
                problems.append(exc)
        if len(problems) == len(schemas):
            raise problems[0]


def _check_path(schema: dict[str, Any], feature: FeatureSpec, origin: str) -> None:
    """ValueError unless ``feature``'s path names a field of ``schema``."""
    named = named_types(schema, {})
    node: dict[str, Any] | None = schema
    for depth, key in enumerate(feature.keys):
        fields = {f["name"]: f["type"] for f in (node or {}).get("fields", ())}
        if key not in fields:
            where = ".".join(feature.keys[:depth]) or "the top level"
            raise ValueError(f"input.features {feature.name!r}: {origin} has no field {key!r} at {where}")
        node = _record_of(fields[key], named) if depth + 1 < len(feature.keys) else None


def _locate(schema: dict[str, Any], body: bytes) -> str:
    """The dotted name of the field where ``body`` stops decoding under ``schema``: the fields are
    read one by one (nested records field by field) until one fails. Only for a failed record."""
    named = named_types(schema, {})
    stream = io.BytesIO(body)

    def walk(record: dict[str, Any], prefix: str) -> str | None:
        for field in record["fields"]:
            name, kind = f"{prefix}{field['name']}", field["type"]
            nested = named.get(kind) if isinstance(kind, str) else kind
            if isinstance(nested, dict) and nested.get("type") == "record":
                failed = walk(nested, f"{name}.")
                if failed is not None:
                    return failed
                continue
            try:
                fastavro.schemaless_reader(stream, fastavro.parse_schema(kind, named_schemas=dict(named)))
            except Exception:  # any decoding failure: this is the field
                return name
        return None

    return walk(schema, "") or "(after the last field)"


class AvroReader:
    """Decodes Avro record values to plain objects (dicts, numbers, strings, None)."""

    def __init__(self, schema: Path | None, schema_ids: Mapping[int, Path]) -> None:
        self.schema = load_schema(schema) if schema is not None else None
        self.by_id = {int(k): load_schema(v) for k, v in schema_ids.items()}
        if (self.schema is None) == (not self.by_id):
            raise ValueError("give exactly one of input.avro_schema and input.avro_schema_ids")

    def schemas(self) -> list[tuple[str, dict[str, Any]]]:
        """(origin, schema) of every schema records may be written in."""
        if self.schema is not None:
            return [("input.avro_schema", self.schema)]
        return [(f"input.avro_schema_ids[{k}]", s) for k, s in sorted(self.by_id.items())]

    def read(self, value: bytes) -> Any:
        """The decoded datum, or DecodeError (bad header, unknown id, schema mismatch)."""
        schema, body = self._schema_and_body(value)
        stream = io.BytesIO(body)
        try:
            datum = fastavro.schemaless_reader(stream, schema)
        except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError, ...
            field = _locate(schema, body)
            raise DecodeError(
                "schema_mismatch", f"field {field}: does not decode as {schema['name']}: {exc}"
            ) from None
        left = len(body) - stream.tell()
        if left:
            raise DecodeError(
                "schema_mismatch", f"{left} bytes left after the last field of {schema['name']}"
            )
        return datum

    def _schema_and_body(self, value: bytes) -> tuple[dict[str, Any], bytes]:
        if self.schema is not None:
            return self.schema, value
        if len(value) < HEADER_BYTES or value[0] != MAGIC:
            raise DecodeError(
                "wrong_encoding", "expected the Confluent wire header (magic byte 0, schema id)"
            )
        schema_id = int.from_bytes(value[1:HEADER_BYTES], "big")
        schema = self.by_id.get(schema_id)
        if schema is None:
            raise DecodeError("unknown_schema", f"schema id {schema_id} is not in input.avro_schema_ids")
        return schema, value[HEADER_BYTES:]


def encode_avro(schema: dict[str, Any], datum: Mapping[str, Any], schema_id: int | None = None) -> bytes:
    """One record value: the datum in ``schema``, behind the wire header when ``schema_id`` is given."""
    stream = io.BytesIO()
    if schema_id is not None:
        stream.write(bytes([MAGIC]) + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(stream, schema, dict(datum))
    return stream.getvalue()


def container_values(path: Path, reader: AvroReader) -> list[bytes]:
    """Each record of the Avro object container file ``path`` as the daemon would receive it.

    With ``input.avro_schema`` a record is resolved into that schema by Avro's rules (a field the
    file lacks takes its default) and written as a bare datum; with ``input.avro_schema_ids`` the
    file must be written in one of those schemas, and each datum goes behind that id's wire header.
    ValueError names the record (from 1) or the reason the file cannot be read.
    """
    try:
        with open(path, "rb") as handle:
            return _container_values(handle, reader)
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None


def _container_values(handle: BinaryIO, reader: AvroReader) -> list[bytes]:
    try:
        records = fastavro.reader(handle, reader_schema=reader.schema)
    except Exception as exc:  # not a container file: fastavro raises ValueError, EOFError, ...
        raise ValueError(f"not an Avro object container file: {exc}") from None
    schema, schema_id = reader.schema, None
    if schema is None:
        schema_id = _id_of(reader, records.writer_schema)
        schema = reader.by_id[schema_id]
    values: list[bytes] = []
    try:
        for datum in records:
            if not isinstance(datum, dict):
                raise TypeError(f"expected an Avro record, got {type(datum).__name__}")
            values.append(encode_avro(schema, datum, schema_id))
    except Exception as exc:  # resolving or decoding the next record failed
        raise ValueError(f"record {len(values) + 1}: {exc}") from None
    return values


def _id_of(reader: AvroReader, writer_schema: Any) -> int:
    """The newest schema id whose schema is ``writer_schema`` (in Avro's Parsing Canonical Form)."""
    canonical = to_parsing_canonical_form(writer_schema)
    matches = [k for k, s in reader.by_id.items() if to_parsing_canonical_form(s) == canonical]
    if not matches:
        raise ValueError(
            "the file's writer schema is none of input.avro_schema_ids "
            "(the daemon would dead-letter its records as unknown_schema)"
        )
    return max(matches)
