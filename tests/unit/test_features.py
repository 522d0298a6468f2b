"""Feature schemas: config checks, the whole-fetch decoder against the per-record reference, policies."""

from __future__ import annotations

import json
import math

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvi.config import load_settings
from streamvi.errors import ConfigError
from streamvi.features.decoder import FeatureDecoder
from streamvi.features.reference import decode_json_record
from streamvi.features.schema import FeatureSpec, hash_bucket
from streamvi.io.base import RawRecord
from streamvi.io.codecs import DEAD_LETTER_REASONS, DecodeError

SCHEMA = [
    FeatureSpec(name="cpu", path="metrics.cpu"),
    FeatureSpec(name="mem", path="metrics.mem", missing="default", malformed="mask", default=0.5),
    FeatureSpec(name="up", type="binary", missing="dead_letter"),
    FeatureSpec(name="kind", type="categorical", vocabulary=["a", "b", 7], malformed="default", default="a"),
    FeatureSpec(name="host", type="hashed", buckets=16, path="meta.host.name"),
    FeatureSpec(name="errors", type="count", malformed="mask"),
]


def record(value: bytes | None, offset: int = 0, key: bytes | None = None) -> RawRecord:
    return RawRecord("in", 0, offset, key, value)


def test_a_good_event_fills_every_column_by_type():
    event = {
        "id": "e1",
        "metrics": {"cpu": 0.25, "mem": 2},
        "up": True,
        "kind": 7,
        "meta": {"host": {"name": "web-1"}},
        "errors": 3,
    }
    batch = FeatureDecoder(SCHEMA).decode_many([record(orjson.dumps(event))])
    assert batch.errors == [None] and batch.record_ids == ["e1"]
    np.testing.assert_array_equal(batch.x[0], [0.25, 2.0, 1.0, 2.0, hash_bucket("web-1", 16), 3.0])
    assert batch.observed is not None and batch.observed.all()


def test_missing_and_malformed_values_follow_each_features_policy():
    event = {"metrics": {"mem": "high"}, "up": 0, "kind": "zzz", "errors": -1}
    batch = FeatureDecoder(SCHEMA).decode_many([record(orjson.dumps(event), key=b"k")])
    assert batch.errors == [None] and batch.record_ids == ["k"]
    row, observed = batch.x[0], batch.observed
    assert observed is not None
    assert math.isnan(row[0])  # cpu missing: masked
    assert math.isnan(row[1])  # mem malformed: masked
    assert row[2] == 0.0 and row[3] == 0.0  # kind unknown: the default "a"
    assert math.isnan(row[4]) and math.isnan(row[5])  # host missing, errors out of range: masked
    assert observed[0].tolist() == [False, False, True, True, False, False]


@pytest.mark.parametrize(
    ("event", "reason", "named"),
    [
        ({"metrics": {"cpu": "x"}, "up": 1}, "wrong_type", "cpu (path metrics.cpu)"),
        ({"metrics": 3, "up": 1}, "wrong_type", "its path runs through a value that is not an object"),
        ({"metrics": {"cpu": 1e39}, "up": 1}, "non_finite", "cpu"),
        ({"up": None}, "missing_field", "feature up is missing"),
        ({"up": 2}, "out_of_range", "feature up"),
        ({"up": 1, "meta": {"host": {"name": [1]}}}, "wrong_type", "host (path meta.host.name)"),
        ({"up": "yes"}, "wrong_type", "feature up has the wrong type: expected a binary value, got str"),
        ({"up": 1, "id": 1.5}, "wrong_type", "'id'"),
    ],
)
def test_a_dead_letter_names_the_feature_and_the_reason(event, reason, named):
    error = FeatureDecoder(SCHEMA).decode_many([record(orjson.dumps(event))]).errors[0]
    assert error is not None and error.reason == reason and named in error.detail
    assert error.reason in DEAD_LETTER_REASONS


def test_record_level_problems_are_the_same_reasons_as_for_vectors():
    decoder = FeatureDecoder(SCHEMA, max_bytes=64)
    values = [None, b"{", b"\xff\xfe", b"[1]", b"{" + b" " * 80 + b"}"]
    reasons = [e.reason for e in decoder.decode_many([record(v) for v in values]).errors if e]
    assert reasons == ["empty_value", "invalid_json", "wrong_encoding", "not_an_object", "oversize"]


# -- the whole-fetch decoder against the per-record reference -----------------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=9),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-2, max_value=2),
    st.sampled_from(["a", "b", "7", "", "web-1"]),
    st.just(7),
    st.just(10**400),
    st.lists(st.integers(), max_size=2),
)
_VALUE = st.one_of(
    _SCALARS, st.dictionaries(st.sampled_from(["cpu", "mem", "host", "name"]), _SCALARS, max_size=3)
)
_EVENT = st.dictionaries(
    st.sampled_from(["metrics", "up", "kind", "meta", "errors", "id", "other"]),
    st.one_of(_VALUE, st.fixed_dictionaries({"host": st.fixed_dictionaries({"name": _SCALARS})})),
    max_size=7,
)
_RAW = st.one_of(
    _EVENT.map(lambda e: orjson.dumps(e, option=orjson.OPT_NON_STR_KEYS) if _dumpable(e) else b"{}"),
    st.binary(max_size=12),
    st.sampled_from([b"[]", b"3", b'"s"', b"null", b'{"id": true}', b"\xc3\x28"]),
)


def _dumpable(event: object) -> bool:
    try:
        orjson.dumps(event)
    except TypeError:  # 10**400 has no JSON form in orjson
        return False
    return True


# Events of plain values (numbers, bools, strings, None, absent), so that whole columns take the
# decoder's block conversions, with the odd bad value (out of range, unknown, huge) among them.
_PLAIN = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=9),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["a", "b", "7", "web-1"]),
    st.just(7),
)
_PLAIN_EVENT = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.none(), st.sampled_from(["x", "y"])),
        "metrics": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"cpu": _PLAIN, "mem": _PLAIN})),
        "up": st.one_of(st.none(), st.booleans(), st.sampled_from([0, 1, 0.0, 1.0, 2])),
        "kind": st.one_of(st.none(), st.sampled_from(["a", "b", 7, "zzz", 3])),
        "meta": st.fixed_dictionaries({"host": st.fixed_dictionaries({"name": _PLAIN})}),
        "errors": st.one_of(st.none(), st.integers(min_value=-2, max_value=40), st.sampled_from([1.0, 2.5])),
    },
)


def _agree(values: list[bytes | None], schema: list[FeatureSpec] = SCHEMA) -> None:
    """The whole-fetch decoder gives every record the reference decoder's vector, mask, id or error."""
    records = [record(v, offset=i, key=b"k%d" % i) for i, v in enumerate(values)]
    batch = FeatureDecoder(schema, max_bytes=4096).decode_many(records)
    assert batch.observed is not None
    for i, value in enumerate(values):
        try:
            row, record_id = decode_json_record(schema, value, 4096)
        except DecodeError as expected:
            got = batch.errors[i]
            assert got is not None and (got.reason, got.detail) == (expected.reason, expected.detail)
            continue
        assert batch.errors[i] is None, batch.errors[i]
        np.testing.assert_array_equal(batch.x[i], row)  # NaN where masked, on both sides
        np.testing.assert_array_equal(batch.observed[i], ~np.isnan(row))
        assert batch.record_ids[i] == (record_id if record_id is not None else f"k{i}")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_RAW, min_size=1, max_size=12))
def test_whole_fetch_and_reference_decoders_agree_on_every_record(values):
    _agree(values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PLAIN_EVENT, min_size=1, max_size=30))
def test_the_block_conversions_agree_with_the_reference_on_plain_events(events):
    _agree([json.dumps(e).encode() for e in events])  # json: integers beyond 64 bits too


# Values at the edges of the typed JSON path: what it must refuse (so that the general path gives the
# reference's answer) and what it must read exactly as orjson does.
_TYPED_EDGES = [
    b'{"up": 1, "errors": 9223372036854775807}',
    b'{"up": 1, "errors": 9223372036854775808}',  # beyond int64, still an int in orjson
    b'{"up": 1, "errors": 18446744073709551616}',  # beyond uint64: a float in orjson
    b'{"up": 1, "kind": -9223372036854775809}',
    b'{"up": 1, "metrics": {"cpu": 1e400}}',
    b'{"up": 1, "metrics": {"cpu": -0.0, "mem": 1e39}}',
    b'{"up": 1.0, "errors": 2.0, "kind": 7.0}',
    b'{"up": true, "errors": true, "kind": true}',
    b'{"up": 1, "metrics": null}',
    b'{"up": 1, "metrics": {"cpu": 1}, "metrics": {"mem": 2}}',
    b'{"up": 1, "metrics": {"cpu": "1"}}',
    b'{"up": 1, "metrics": {"cpu": [1]}}',
    b'{"up": 1, "metrics": {"cpu": {"v": 1}}}',
    b'{"up": 1, "metrics": {"cpu": 1, "other": 2}}',
    b'{"up": 1, "meta": {"host": 3}}',
    b'{"up": 1, "meta": {"host": {"name": {"x": 1}}}}',
    b'{"up": 1, "meta": {"host": {"name": "caf\xc3\xa9"}}}',
    b'{"up": 1, "meta": {"host": {"name": "\\ud83d\\ude00"}}}',
    b'{"up": 1, "meta": {"host": {"name": "\\udc00"}}}',
    b'{"up": 1, "other": 1e999}',
    b'{"up": 1, "other": "\xff"}',
    b'{"up": 1, "other": "\xed\xa0\x80"}',
    b'{"up": 1, "\\u0069d": "escaped"}',
    b'{"up": 1, "id": 9223372036854775808}',
    b'{"up": 1, "id": false}',
    b'{"up": 1, "id": 2.0}',
    b'{"up": 1} ',
    b'{"up": 1} {}',
    b'{"up": 1, "kind": "b", "errors": -0}',
    b"[]",
]


@pytest.mark.parametrize("value", _TYPED_EDGES)
def test_the_typed_path_agrees_with_the_reference_at_its_edges(value):
    _agree([value])  # alone, the typed path takes it whenever it decodes typed
    _agree([value, b'{"up": 0, "metrics": {"cpu": 0.5}}'])


def test_plain_fetches_take_the_typed_path_and_others_the_general_one():
    typed = FeatureDecoder(SCHEMA)._typed
    assert typed is not None
    good = [b'{"id": "a", "up": true, "metrics": {"cpu": 1.5}}', b'{"up": 0, "meta": {"host": {}}}']
    parts, rest = typed.decode(good * 8, 64)
    assert [indices for indices, _ in parts] == [list(range(16))] and rest == []
    odd = [b'{"up": 1, "other": 2}', b'{"up": "yes"}', None, b"", b'{"up": 1, "metrics": {"cpu": 1}} ' * 3]
    mixed = [value for bad in odd for value in (*(good * 4), bad)]
    parts, rest = typed.decode(mixed, 64)
    assert rest == [8, 17, 26, 35, 44] and len(parts[0][0]) == 40  # the others stay typed
    assert typed.decode([*odd, *good], 64) == ([], list(range(7)))  # too many: all go the general way
    assert FeatureDecoder([FeatureSpec(name="id")])._typed is None  # a feature at the id field


# Unknown fields with text orjson refuses but a parser skipping them might pass: numbers beyond a
# double, invalid UTF-8, nesting past orjson's limit, among valid JSON of every kind.
_JSON_TEXT = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=4)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
).map(lambda value: json.dumps(value).encode())  # integers beyond 64 bits, escaped text, Infinity
_ODD = st.sampled_from(
    [
        b"1e999",
        b"-1E+400",
        b"1e-400",
        b"1" * 400,
        b'"\xff"',
        b'"\xed\xa0\x80"',
        b'"\\ud800"',
        b'"caf\xc3\xa9"',
        b"[" * 1100 + b"]" * 1100,
        b"[" * 990 + b"]" * 990,
        b'"123e4567"',
    ]
)
_UNKNOWN = st.one_of(_JSON_TEXT, _ODD, st.tuples(_JSON_TEXT, _ODD).map(lambda pair: b"[%s, %s]" % pair))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_UNKNOWN, st.sampled_from([b'{"up": 1, "other": %s}', b'{"metrics": {"x": %s, "cpu": 2}, "up": 0}']))
def test_unknown_fields_of_any_text_agree_with_the_reference(text, frame):
    _agree([frame % text])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_RAW, min_size=1, max_size=6))
def test_each_record_alone_agrees_with_the_reference(values):
    """A fetch of one record takes the typed path whenever that record decodes typed."""
    for value in values:
        _agree([value])


# Two features at one path, of different types: each value must suit both, or take the general path.
SHARED = [
    FeatureSpec(name="up_number", path="up", malformed="mask"),
    FeatureSpec(name="kind_count", path="kind", type="count", malformed="mask"),
    *SCHEMA,
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PLAIN_EVENT, min_size=1, max_size=12), st.lists(_RAW, max_size=2))
def test_features_sharing_a_path_agree_with_the_reference(events, raw):
    _agree([json.dumps(e).encode() for e in events], SHARED)
    _agree([json.dumps(e).encode() for e in events] + raw, SHARED)


# -- config -------------------------------------------------------------------------------------------


def test_a_schema_file_is_read_and_dim_is_the_number_of_features(tmp_path):
    path = tmp_path / "features.yaml"
    path.write_text("features:\n  - {name: cpu, path: metrics.cpu}\n  - {name: up, type: binary}\n")
    settings_ = load_settings(overrides=[f"input.features={path}"], environ={})
    assert settings_.input.dim == 2 and [f.name for f in settings_.input.features or []] == ["cpu", "up"]
    # the snapshot's copy of the config holds the schema itself and loads without the file
    path.unlink()
    data = settings_.public_dict()
    assert data["input"]["features"][0]["path"] == "metrics.cpu"
    assert "likelihood" not in data["model"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["input.features=[{name: a, type: categorical}]"], "vocabulary"),
        (["input.features=[{name: a, type: hashed}]"], "buckets"),
        (["input.features=[{name: a, missing: default}]"], "needs a default"),
        (
            ["input.features=[{name: a, type: count, missing: default, default: -1}]"],
            "not a valid count value",
        ),
        (["input.features=[{name: a}, {name: a}]"], "duplicate"),
        (["input.features=[{name: a, path: m}, {name: b, path: m.x}]"], "runs through"),
        (["input.features=[{name: a}]", "input.dim=3"], "input.dim"),
        (["input.features=[{name: a}]", "input.context_dim=2"], "input.context_dim"),
        (["input.features=[{name: a}]", "input.format=f32"], "input.format=f32"),
        (["input.features=[{name: a}]", "model.likelihood=gaussian"], "model.likelihood"),
        (["input.normalise=false"], "input.normalise"),
        (["input.features=[{name: a}]", "input.normalise=false", "input.normalise_warmup=5"], "warmup"),
        (["input.features=/no/such/file.yaml"], "/no/such/file.yaml"),
        (["input.format=avro"], "input.format=avro"),
    ],
)
def test_a_bad_schema_fails_at_load_naming_the_setting(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("(", r"\(")):
        load_settings(overrides=overrides, environ={})


def test_schema_infer_prints_a_schema_that_validates(tmp_path):
    from click.testing import CliRunner

    from streamvi.cli.main import cli
    from tests.unit import feature_events

    sample = tmp_path / "sample.jsonl"
    events = feature_events.events()[:200]
    events[0]["errors"] = 3  # a count, seen once
    sample.write_bytes(b"\n".join(orjson.dumps(e) for e in events))
    result = CliRunner().invoke(cli, ["schema", "infer", "--input", str(sample)])
    assert result.exit_code == 0, result.output
    schema_file = tmp_path / "features.yaml"
    schema_file.write_text(result.output)
    loaded = load_settings(overrides=[f"input.features={schema_file}"], environ={})
    kinds = {f.source: f.type for f in loaded.input.features or []}
    assert kinds["mean.radius"] == "numeric" and kinds["errors"] == "count"
    diagnosis = next(f for f in loaded.input.features or [] if f.source == "diagnosis")
    assert diagnosis.type == "categorical" and set(diagnosis.vocabulary or []) == {"benign", "malignant"}
    assert "# mean.radius: in " in result.output and "range [" in result.output
    validated = CliRunner().invoke(cli, ["--set", f"input.features={schema_file}", "config", "validate"])
    assert validated.exit_code == 0 and "32 features" in validated.output, validated.output


def test_block_conversion_tells_a_nan_double_from_a_null():
    """Avro doubles can be NaN: the block conversion marks it as the reference does, not as missing."""
    from streamvi.features.blocks import count_block, numeric_block

    column = [1.0, None, math.nan, 2]
    spec, counted = FeatureSpec(name="v"), FeatureSpec(name="c", type="count")
    for block, feature in ((numeric_block, spec), (count_block, counted)):
        converted = block([column])
        assert converted is not None and converted[1] is not None
        assert converted[1][0].tolist() == [feature.code(v)[0] for v in column]
