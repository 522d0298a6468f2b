"""Avro input: round trips with and without the Confluent wire header, mismatches dead-lettered by field."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from streamvi.config import load_settings
from streamvi.errors import ConfigError
from streamvi.features.avro import encode_avro, load_schema
from streamvi.features.decoder import FeatureDecoder
from streamvi.features.schema import FeatureSpec
from streamvi.io.base import RawRecord
from streamvi.runtime import build_decoder

EVENT_SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [
        {"name": "id", "type": "string"},
        {
            "name": "metrics",
            "type": {
                "type": "record",
                "name": "Metrics",
                "fields": [
                    {"name": "cpu", "type": ["null", "double"], "default": None},
                    {"name": "requests", "type": "long"},
                ],
            },
        },
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["web", "batch"]}},
        {"name": "up", "type": "boolean"},
    ],
}
OTHER_SCHEMA = {
    "type": "record",
    "name": "Other",
    "fields": [{"name": "id", "type": "string"}, {"name": "up", "type": "boolean"}],
}
FEATURES = [
    {"name": "cpu", "path": "metrics.cpu"},
    {"name": "requests", "path": "metrics.requests", "type": "count"},
    {"name": "kind", "type": "categorical", "vocabulary": ["web", "batch"]},
    {"name": "up", "type": "binary"},
]
EVENTS = [
    {"id": "a", "metrics": {"cpu": 0.5, "requests": 12}, "kind": "batch", "up": True},
    {"id": "b", "metrics": {"cpu": None, "requests": 0}, "kind": "web", "up": False},
]
EXPECTED = np.array([[0.5, 12, 1, 1], [np.nan, 0, 0, 0]], dtype=np.float32)


@pytest.fixture
def schema_files(tmp_path):
    event, other = tmp_path / "event.avsc", tmp_path / "other.avsc"
    event.write_text(json.dumps(EVENT_SCHEMA))
    other.write_text(json.dumps(OTHER_SCHEMA))
    return event, other


def settings_for(*overrides: str):
    return load_settings(
        overrides=["input.format=avro", f"input.features={orjson.dumps(FEATURES).decode()}", *overrides],
        environ={},
    )


def records(values: list[bytes]) -> list[RawRecord]:
    return [RawRecord("in", 0, i, None, v) for i, v in enumerate(values)]


def test_round_trip_without_a_header(schema_files):
    event, _ = schema_files
    decoder = build_decoder(settings_for(f"input.avro_schema={event}"))
    schema = load_schema(event)
    batch = decoder.decode_many(records([encode_avro(schema, e) for e in EVENTS]))
    assert batch.errors == [None, None] and batch.record_ids == ["a", "b"]
    np.testing.assert_array_equal(batch.x, EXPECTED)


def test_round_trip_with_the_wire_header_and_two_schema_ids(schema_files):
    event, other = schema_files
    settings = settings_for(f"input.avro_schema_ids={{7: {event}, 9: {other}}}")
    decoder = build_decoder(settings)
    assert isinstance(decoder, FeatureDecoder)
    values = [encode_avro(load_schema(event), e, schema_id=7) for e in EVENTS]
    values.append(encode_avro(load_schema(other), {"id": "c", "up": True}, schema_id=9))
    batch = decoder.decode_many(records(values))
    assert batch.errors == [None, None, None]
    np.testing.assert_array_equal(batch.x[:2], EXPECTED)
    np.testing.assert_array_equal(batch.x[2], [np.nan, np.nan, np.nan, 1.0])  # the other schema's fields


def test_a_record_that_does_not_match_its_schema_is_a_dead_letter_naming_the_field(schema_files):
    event, _ = schema_files
    decoder = build_decoder(settings_for(f"input.avro_schema={event}"))
    good = encode_avro(load_schema(event), EVENTS[0])
    # the union index of metrics.cpu set to 5: no such branch
    bad_union = good[:2] + bytes([10]) + good[3:]
    truncated = good[:-2]
    batch = decoder.decode_many(records([bad_union, truncated, good + b"\x00\x00"]))
    reasons = [(e.reason, e.detail) for e in batch.errors if e is not None]
    assert len(reasons) == 3 and all(r == "schema_mismatch" for r, _ in reasons)
    assert reasons[0][1].startswith("field metrics.cpu:"), reasons[0]
    assert reasons[1][1].startswith("field kind:") or reasons[1][1].startswith("field up:"), reasons[1]
    assert "2 bytes left" in reasons[2][1]


def test_a_feature_of_the_wrong_avro_type_is_a_dead_letter_naming_the_feature(tmp_path):
    path = tmp_path / "s.avsc"
    path.write_text(
        json.dumps({"type": "record", "name": "S", "fields": [{"name": "cpu", "type": "string"}]})
    )
    decoder = FeatureDecoder([FeatureSpec(name="cpu")], "avro", avro_schema=path)
    error = decoder.decode_many(records([encode_avro(load_schema(path), {"cpu": "high"})])).errors[0]
    assert error is not None and error.reason == "wrong_type" and "feature cpu" in error.detail


def test_wire_header_problems_are_dead_letters(schema_files):
    event, _ = schema_files
    decoder = build_decoder(settings_for(f"input.avro_schema_ids={{7: {event}}}"))
    good = encode_avro(load_schema(event), EVENTS[0], schema_id=7)
    batch = decoder.decode_many(records([good[5:], b"\x00\x00\x00\x00\x08" + good[5:], good]))
    assert [e.reason if e else None for e in batch.errors] == ["wrong_encoding", "unknown_schema", None]
    assert "schema id 8" in batch.errors[1].detail  # type: ignore[union-attr]


def test_config_checks_the_schema_files_and_the_feature_paths(schema_files, tmp_path):
    event, other = schema_files
    with pytest.raises(ConfigError, match=r"input\.features 'cpu': input\.avro_schema_ids\[9\] has no field"):
        settings_for(f"input.avro_schema_ids={{9: {other}}}")
    with pytest.raises(ConfigError, match=r"exactly one of input\.avro_schema"):
        settings_for()
    with pytest.raises(ConfigError, match=r"applies only with input\.format=avro"):
        load_settings(overrides=[f"input.avro_schema={event}"], environ={})
    broken = tmp_path / "broken.avsc"
    broken.write_text("{")
    with pytest.raises(ConfigError, match=r"broken\.avsc: not JSON"):
        settings_for(f"input.avro_schema={broken}")
