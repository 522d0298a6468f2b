"""The columnar Avro reader against fastavro record by record: good datums, damaged ones, two schemas."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvi.features.avro import encode_avro, load_schema
from streamvi.features.avro_columns import columnar_reader, read_fetch
from streamvi.features.decoder import FeatureDecoder, record_id_of
from streamvi.features.reference import decode_features
from streamvi.features.schema import FeatureSpec
from streamvi.io.base import RawRecord
from streamvi.io.codecs import DecodeError

_LEVEL = {"type": "enum", "name": "Level", "symbols": ["low", "high", "other"]}
SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [
        {"name": "id", "type": ["null", "string", "long"]},
        {
            "name": "metrics",
            "type": {
                "type": "record",
                "name": "Metrics",
                "fields": [
                    {"name": "cpu", "type": ["null", "double"]},
                    {"name": "ratio", "type": "float"},
                    {"name": "requests", "type": "long"},
                    {"name": "note", "type": "string"},
                ],
            },
        },
        {
            "name": "extra",
            "type": ["null", {"type": "record", "name": "Extra", "fields": [{"name": "n", "type": "int"}]}],
        },
        {"name": "level", "type": _LEVEL},
        {"name": "up", "type": ["boolean", "null"]},
        {"name": "blob", "type": "bytes"},
        {"name": "tag", "type": {"type": "fixed", "name": "Tag", "size": 2}},
        {"name": "host", "type": "string"},
        {"name": "mixed", "type": ["null", "string", "long", "double"]},
    ],
}
OTHER = {
    "type": "record",
    "name": "Other",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "up", "type": "long"},
        {"name": "host", "type": "long"},
    ],
}
FEATURES = [
    FeatureSpec(name="cpu", path="metrics.cpu"),
    FeatureSpec(name="ratio", path="metrics.ratio", type="binary", malformed="mask"),
    FeatureSpec(name="requests", path="metrics.requests", type="count", malformed="default", default=0),
    FeatureSpec(name="note", path="metrics.note", malformed="mask"),  # a string for a number: masked
    FeatureSpec(name="n", path="extra.n", type="count", missing="default", default=1),
    FeatureSpec(name="level", type="categorical", vocabulary=["low", "high"], malformed="mask"),
    FeatureSpec(name="up", type="binary", missing="dead_letter"),
    FeatureSpec(name="host", type="hashed", buckets=8),
    FeatureSpec(name="absent", path="metrics.absent"),
    FeatureSpec(name="up_number", path="up", malformed="mask"),  # a boolean for a number: masked
    FeatureSpec(name="level_count", path="level", type="count", malformed="mask"),
]

_TEXT = st.text(max_size=6)
_DATUM = st.fixed_dictionaries(
    {
        "id": st.one_of(st.none(), st.sampled_from(["a", "b"]), st.integers(-(2**63), 2**63 - 1)),
        "metrics": st.fixed_dictionaries(
            {
                "cpu": st.one_of(st.none(), st.floats(), st.just(1e39)),
                "ratio": st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(width=32)),
                "requests": st.one_of(st.integers(-3, 40), st.integers(-(2**63), 2**63 - 1)),
                "note": st.sampled_from(["", "x", "1.5"]),
            }
        ),
        "extra": st.one_of(st.none(), st.fixed_dictionaries({"n": st.integers(-(2**31), 2**31 - 1)})),
        "level": st.sampled_from(_LEVEL["symbols"]),
        "up": st.one_of(st.none(), st.booleans()),
        "blob": st.binary(max_size=4),
        "tag": st.binary(min_size=2, max_size=2),
        "host": _TEXT,
        "mixed": st.one_of(st.none(), _TEXT, st.integers(-5, 5), st.floats()),
    }
)
_OTHER_DATUM = st.fixed_dictionaries(
    {"id": st.sampled_from(["o1", "o2"]), "up": st.integers(-1, 2), "host": st.integers(-9, 9)}
)


@pytest.fixture(scope="module")
def schemas(tmp_path_factory):
    root = tmp_path_factory.mktemp("schemas")
    paths = {}
    for name, schema in (("event", SCHEMA), ("other", OTHER)):
        paths[name] = root / f"{name}.avsc"
        paths[name].write_text(json.dumps(schema))
    return paths


def _damaged(value: bytes, cut: int, flip: int, byte: int, tail: bytes) -> bytes:
    """``value`` cut short, with one byte changed, or with bytes after its end."""
    if cut % 4 == 1:
        return value[: len(value) * cut // 17]
    if cut % 4 == 2 and value:
        i = flip % len(value)
        return value[:i] + bytes([byte]) + value[i + 1 :]
    return value + tail if cut % 4 == 3 else value


def _plain(detail: str) -> str:
    """A dead letter's detail without the object addresses some fastavro messages hold."""
    return re.sub(r" at 0x[0-9a-f]+", "", detail)


def _agree(decoder: FeatureDecoder, values: list[bytes | None]) -> None:
    """The whole fetch gives every value fastavro's record, by the reference rules."""
    batch = decoder.decode_many([RawRecord("in", 0, i, None, v) for i, v in enumerate(values)])
    for i, value in enumerate(values):
        try:
            document = decoder.parse(value)
            record_id = record_id_of(document)
            row = decode_features(FEATURES, document)
        except DecodeError as expected:
            got = batch.errors[i]
            assert got is not None and (got.reason, _plain(got.detail)) == (
                expected.reason,
                _plain(expected.detail),
            )
            continue
        assert batch.errors[i] is None, batch.errors[i]
        np.testing.assert_array_equal(batch.x[i], row)  # NaN where masked, on both sides
        assert batch.record_ids[i] == record_id


_DAMAGE = st.tuples(st.integers(0, 40), st.integers(0, 500), st.integers(0, 255), st.binary(max_size=3))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_DATUM, _DAMAGE), min_size=1, max_size=10))
def test_columnar_reads_agree_with_fastavro_on_good_and_damaged_datums(schemas, datums):
    decoder = FeatureDecoder(FEATURES, "avro", avro_schema=schemas["event"])
    parsed = load_schema(schemas["event"])
    _agree(decoder, [_damaged(encode_avro(parsed, d), *damage) for d, damage in datums])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just(1), _DATUM, _DAMAGE),
            st.tuples(st.just(2), _OTHER_DATUM, _DAMAGE),
            st.tuples(st.just(9), _OTHER_DATUM, _DAMAGE),
        ),
        min_size=1,
        max_size=10,
    )
)
def test_a_fetch_of_two_schema_ids_agrees_with_fastavro(schemas, datums):
    ids = {1: schemas["event"], 2: schemas["other"]}
    decoder = FeatureDecoder(FEATURES, "avro", avro_schema_ids=ids)
    parsed = {1: load_schema(ids[1]), 2: load_schema(ids[2]), 9: load_schema(ids[2])}
    values = [_damaged(encode_avro(parsed[k], d, k), *damage) for k, d, damage in datums]
    _agree(decoder, [*values, None, b"", b"\x01abcdef", b"\x00\x00"])


def test_good_datums_are_read_columnar_and_bad_ones_left_to_fastavro(schemas):
    parsed = load_schema(schemas["event"])
    datum = {
        "id": "a",
        "metrics": {"cpu": float("nan"), "ratio": 1.0, "requests": 3, "note": "x"},
        "extra": None,
        "level": "high",
        "up": True,
        "blob": b"\xff",
        "tag": b"ab",
        "host": "h\u00e9",
        "mixed": 2.5,
    }
    good = encode_avro(parsed, datum)
    paths = [("id",), *(f.keys for f in FEATURES)]
    reader = columnar_reader(parsed, paths)
    assert reader is not None
    bad = [good + b"\x00", good[:-1], good.replace(b"h\xc3\xa9", b"h\xff\xa9")]
    groups, rest = read_fetch({None: reader}, [good, *bad, good], paths, 1 << 20)
    assert [g[0].tolist() for g in groups] == [[0, 4]] and rest == [1, 2, 3]
    _agree(FeatureDecoder(FEATURES, "avro", avro_schema=schemas["event"]), [good, *bad])


@pytest.mark.parametrize(
    "field",
    [
        {"name": "metrics", "type": {"type": "array", "items": "double"}},
        {"name": "metrics", "type": "double"},
        {"name": "metrics", "type": ["null", "string", {"type": "record", "name": "M", "fields": []}]},
        {"name": "up", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "next", "type": ["null", "E"]},
    ],
)
def test_schemas_the_columnar_reader_does_not_read_go_to_fastavro(field):
    schema = {"type": "record", "name": "E", "fields": [field]}
    assert columnar_reader(schema, [("id",), ("metrics", "cpu"), ("up",)]) is None
