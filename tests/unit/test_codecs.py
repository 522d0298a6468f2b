from __future__ import annotations

import math
import typing

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from streamvi.config import ModelSettings
from streamvi.datasets import encode_record
from streamvi.io.base import RawRecord
from streamvi.io.codecs import (
    DEAD_LETTER_REASONS,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    DecodeError,
    RecordDecoder,
    Support,
    dead_letter_message,
    latent_messages,
    metrics_message,
)
from streamvi.metrics import Metrics

DIM = 4


def record(value: bytes | None, key: bytes | None = b"k1", offset: int = 7) -> RawRecord:
    return RawRecord("in", 2, offset, key, value, [("trace", b"abc")])


def reason_of(decoder: RecordDecoder, value: bytes | None) -> str:
    with pytest.raises(DecodeError) as info:
        decoder.decode(record(value))
    assert info.value.reason in DEAD_LETTER_REASONS
    return info.value.reason


def test_json_round_trip_with_id_and_extra_fields():
    decoder = RecordDecoder("json", DIM, 1024)
    decoded = decoder.decode(record(b'{"id": "r-1", "x": [0, 0.5, 1, -2.25], "label": 3}'))
    np.testing.assert_array_equal(decoded.x, np.array([0, 0.5, 1, -2.25], dtype=np.float32))
    assert decoded.x.dtype == np.float32
    assert decoded.record_id == "r-1"


def test_json_without_id_uses_the_key():
    decoded = RecordDecoder("json", DIM, 1024).decode(record(b'{"x": [1, 2, 3, 4]}', key=b"key-9"))
    assert decoded.record_id == "key-9"


def test_f32_round_trip():
    x = np.array([1.5, -2.0, 0.0, 3.25], dtype=np.float32)
    decoded = RecordDecoder("f32", DIM, 1024).decode(record(encode_record(x, "a", "f32")))
    np.testing.assert_array_equal(decoded.x, x)


@pytest.mark.parametrize(
    ("fmt", "value", "reason"),
    [
        ("json", None, "empty_value"),
        ("json", b"", "empty_value"),
        ("json", b'{"x": [' + b"1," * 600 + b"1]}", "oversize"),
        ("json", b"\xff\xfe{", "wrong_encoding"),
        ("json", b"{not json", "invalid_json"),
        ("json", b"[1, 2, 3, 4]", "not_an_object"),
        ("json", b'{"y": [1, 2, 3, 4]}', "missing_field"),
        ("json", b'{"x": "1234"}', "wrong_type"),
        ("json", b'{"x": [1, "2", 3, 4]}', "wrong_type"),
        ("json", b'{"x": [1, true, 3, 4]}', "wrong_type"),
        ("json", b'{"x": [1, 2, 3, 4], "id": {"a": 1}}', "wrong_type"),
        ("json", b'{"x": [1, 2, 3, 4], "id": true}', "wrong_type"),
        ("json", b'{"x": [1, 2, 3, 4], "id": 1.5}', "wrong_type"),
        ("json", b'{"x": [1, 2, 3]}', "wrong_length"),
        ("json", b'{"x": [1, 2, 3, 1e39]}', "non_finite"),
        ("json", b'{"x": [1, 2, 3, NaN]}', "invalid_json"),
        ("f32", b"\x00" * 15, "wrong_length"),
        ("f32", np.array([1, 2, np.nan, 4], "<f4").tobytes(), "non_finite"),
        ("f32", np.array([1, 2, np.inf, 4], "<f4").tobytes(), "non_finite"),
    ],
)
def test_bad_records_have_a_stable_reason(fmt, value, reason):
    assert reason_of(RecordDecoder(fmt, DIM, 1024), value) == reason


def test_dead_letter_keeps_bytes_and_says_why_and_where():
    bad = record(b"{oops", key=b"kk", offset=41)
    error = DecodeError("invalid_json", "unexpected character")
    message = dead_letter_message(bad, "dlq", error)
    headers = dict(message.headers)
    assert message.topic == "dlq"
    assert message.value == b"{oops"
    assert message.key == b"kk"
    assert headers["trace"] == b"abc"  # the original headers survive
    assert headers[HEADER_REASON] == b"invalid_json"
    assert headers[HEADER_TOPIC] == b"in"
    assert headers[HEADER_PARTITION] == b"2"
    assert headers[HEADER_OFFSET] == b"41"


def test_latent_messages_follow_the_contract():
    records = [record(b"x", key=b"a", offset=0), record(b"x", key=None, offset=1)]
    z_loc = np.array([[0.5, -1.0], [2.0, 0.0]], dtype=np.float32)
    z_scale = np.array([[1.0, 0.25], [0.5, 0.5]], dtype=np.float32)
    bound = np.array([-10.5, np.nan], dtype=np.float32)
    messages = latent_messages("lat", records, ["a", None], z_loc, z_scale, bound, 12, "elbo")
    assert [m.key for m in messages] == [b"a", None]
    first, second = (orjson.loads(m.value) for m in messages)
    assert first == {
        "id": "a",
        "topic": "in",
        "partition": 2,
        "offset": 0,
        "model_step": 12,
        "bound": "elbo",
        "z_mean": [0.5, -1.0],
        "z_scale": [1.0, 0.25],
        "elbo": -10.5,
    }
    assert second["elbo"] is None  # a non-finite score never produces invalid JSON


def _reference_latent(record, record_id, z_loc, z_scale, bound, step, name):
    """The contract written out field by field: what each latents value must parse to (numbers as
    the float32 they were; the JSON holds the shortest text that reads back as that float32)."""

    def number(v):
        return float(v) if math.isfinite(v) else None

    return {
        "id": record_id,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "model_step": step,
        "bound": name,
        "z_mean": [number(v) for v in z_loc],
        "z_scale": [number(v) for v in z_scale],
        "elbo": number(bound),
    }


any_float32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@given(
    st.integers(1, 9),
    st.integers(1, 5),
    st.data(),
)
def test_batch_encoded_latents_equal_the_per_record_contract(n, width, data):
    ids = data.draw(st.lists(st.one_of(st.none(), st.text(max_size=8)), min_size=n, max_size=n))
    topics = st.sampled_from(["in", 'we"ird/tópic'])
    offsets = data.draw(st.lists(st.integers(0, 2**40), min_size=n, max_size=n))
    records = [RawRecord(data.draw(topics), data.draw(st.integers(0, 3)), o, b"k", b"") for o in offsets]
    values = data.draw(st.lists(any_float32, min_size=n * (2 * width + 1), max_size=n * (2 * width + 1)))
    array = np.asarray(values, dtype=np.float32)
    z_loc = array[: n * width].reshape(n, width)
    z_scale = array[n * width : 2 * n * width].reshape(n, width)
    bound = array[2 * n * width :]
    messages = latent_messages("lat", records, ids, z_loc, z_scale, bound, 3, "iwae")

    def as_float32(value):
        if isinstance(value, list):
            return [as_float32(v) for v in value]
        return float(np.float32(value)) if isinstance(value, float) else value

    parsed = [{k: as_float32(v) for k, v in orjson.loads(m.value).items()} for m in messages]
    assert parsed == [
        _reference_latent(r, i, z_loc[k], z_scale[k], bound[k], 3, "iwae")
        for k, (r, i) in enumerate(zip(records, ids, strict=True))
    ]
    assert all(m.topic == "lat" and m.key == b"k" for m in messages)


def test_metrics_message_is_valid_json_with_non_finite_values():
    message = metrics_message("met", {"step": 3, "elbo": math.inf, "kl": 1.5})
    payload = orjson.loads(message.value)
    assert payload["elbo"] is None and payload["kl"] == 1.5 and payload["step"] == 3
    assert "timestamp" in payload


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@given(st.lists(finite, min_size=DIM, max_size=DIM), st.sampled_from(["json", "f32"]))
def test_valid_vectors_round_trip(values, fmt):
    x = np.asarray(values, dtype=np.float32)
    decoded = RecordDecoder(fmt, DIM, 4096).decode(record(encode_record(x, "id", fmt)))
    np.testing.assert_array_equal(decoded.x, x)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=3), children, max_size=4)
    ),
    max_leaves=20,
)
payloads = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS) if _dumpable(v) else b"null"),
    st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=2)), max_size=6).map(
        lambda xs: orjson.dumps({"x": xs}) if _dumpable(xs) else b"{}"
    ),
)


def _dumpable(value: object) -> bool:
    try:
        orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return False
    return True


@given(payloads, st.sampled_from(["json", "f32"]))
def test_any_payload_is_a_valid_row_or_a_reasoned_dead_letter(value, fmt):
    decoder = RecordDecoder(fmt, DIM, 48)
    try:
        decoded = decoder.decode(record(value))
    except DecodeError as error:
        assert error.reason in DEAD_LETTER_REASONS
    else:
        assert decoded.x.shape == (DIM,)
        assert decoded.x.dtype == np.float32
        assert np.isfinite(decoded.x).all()


def test_context_is_required_and_checked_when_configured():
    decoder = RecordDecoder("json", DIM, 4096, context_dim=2)
    decoded = decoder.decode(record(b'{"x": [1, 2, 3, 4], "c": [0.5, -1]}'))
    np.testing.assert_array_equal(decoded.c, np.array([0.5, -1], np.float32))
    assert reason_of(decoder, b'{"x": [1, 2, 3, 4]}') == "missing_context"
    assert reason_of(decoder, b'{"x": [1, 2, 3, 4], "c": [1]}') == "wrong_length"
    assert reason_of(decoder, b'{"x": [1, 2, 3, 4], "c": "ab"}') == "wrong_type"
    # without a configured context, a 'c' field is ignored
    assert RecordDecoder("json", DIM, 4096).decode(record(b'{"x": [1, 2, 3, 4], "c": [9]}')).c.shape == (0,)


def test_f32_carries_the_context_after_x():
    decoder = RecordDecoder("f32", DIM, 4096, context_dim=2)
    x, c = np.arange(4, dtype=np.float32), np.array([7, 8], np.float32)
    decoded = decoder.decode(record(encode_record(x, "a", "f32", context=c)))
    np.testing.assert_array_equal(decoded.x, x)
    np.testing.assert_array_equal(decoded.c, c)
    assert reason_of(decoder, encode_record(x, "a", "f32")) == "wrong_length"


def reference(decoder: RecordDecoder, value: bytes) -> tuple[str, np.ndarray | None, str | None]:
    """What the orjson reference decoder makes of a JSON value: (reason or "ok", x, id)."""
    try:
        x, _, record_id = decoder._decode_json(value)
    except DecodeError as error:
        return error.reason, None, None
    if not np.isfinite(x).all():
        return "non_finite", None, None
    if reference_out_of_range(decoder.support, x) is not None:
        return "out_of_range", None, None
    return "ok", x, record_id


def reference_out_of_range(support: Support, x: np.ndarray) -> int | None:
    """The first index of x outside the support, value by value in plain Python, or None."""
    for index, value in enumerate(float(v) for v in x):
        if support.kind == "unit_interval" and not 0.0 <= value <= 1.0:
            return index
        if support.kind == "count" and not (value >= 0.0 and value.is_integer()):
            return index
        if support.kind == "bounded_count" and not (0.0 <= value <= support.upper and value.is_integer()):
            return index
    return None


numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    # values near the edges of the supports: [0, 1] and the non-negative integers
    st.floats(-1e-6, 1 + 1e-6),
    st.integers(-2, 20),
    st.sampled_from([0.0, -0.0, 1.0, 1.0000001, -1e-7, 2.5, 16.0]),
)
likelihoods = st.sampled_from(typing.get_args(ModelSettings.model_fields["likelihood"].annotation))
#: model.binomial_total_count wherever a support is built (the other likelihoods ignore it)
TOTAL = 16
elements = numbers | st.booleans() | st.none() | st.text(max_size=2) | st.lists(numbers, max_size=2)
documents = st.fixed_dictionaries(
    {},
    optional={
        "x": st.one_of(
            st.lists(numbers, min_size=DIM - 1, max_size=DIM + 1),
            st.lists(st.one_of(numbers, elements), min_size=DIM, max_size=DIM),
            elements,
        ),
        "id": st.one_of(st.text(max_size=3), st.integers(-5, 5), st.booleans(), st.none(), st.floats(0, 1)),
        "extra": elements,
    },
)


@given(documents, likelihoods)
def test_fast_json_path_agrees_with_the_reference_decoder(document, likelihood):
    decoder = RecordDecoder("json", DIM, 4096, support=Support.of_likelihood(likelihood, TOTAL))
    value = orjson.dumps(document)
    expected_reason, expected_x, expected_id = reference(decoder, value)
    batch = decoder.decode_many([record(value, key=None)])
    error = batch.errors[0]
    assert (error.reason if error is not None else "ok") == expected_reason
    if error is not None and error.reason == "out_of_range":
        x, _, _ = decoder._decode_json(value)
        index = reference_out_of_range(decoder.support, x)
        assert error.detail.startswith(f"x[{index}] = ")
    if expected_x is not None:
        np.testing.assert_array_equal(batch.x[0], expected_x)
        assert batch.record_ids[0] == expected_id


def test_nested_arrays_are_wrong_type_even_when_they_flatten_to_the_right_length():
    decoder = RecordDecoder("json", DIM, 4096)
    assert reason_of(decoder, b'{"x": [[1], 2, 3, 4]}') == "wrong_type"
    assert reason_of(decoder, b'{"x": [[1, 2], [3, 4]]}') == "wrong_type"
    assert reason_of(decoder, b'{"x": [[1], [2], [3], [4]]}') == "wrong_type"


def test_decode_many_keeps_good_rows_around_bad_records():
    for fmt in ("json", "f32"):
        decoder = RecordDecoder(fmt, DIM, 4096)
        rows = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM)
        values = [
            encode_record(rows[0], "a", fmt),
            b"{bad" if fmt == "json" else b"\x00" * 3,
            encode_record(rows[1], "b", fmt),
            encode_record(np.full(DIM, np.nan, np.float32), "c", fmt)
            if fmt == "f32"
            else b'{"x": [1e39,0,0,0]}',
            encode_record(rows[2], "d", fmt),
        ]
        batch = decoder.decode_many([record(v, key=f"k{i}".encode()) for i, v in enumerate(values)])
        assert [e.reason if e is not None else None for e in batch.errors] == [
            None,
            "invalid_json" if fmt == "json" else "wrong_length",
            None,
            "non_finite",
            None,
        ]
        np.testing.assert_array_equal(batch.x[[0, 2, 4]], rows)
        expected_ids = ["a", "b", "d"] if fmt == "json" else ["k0", "k2", "k4"]
        assert [batch.record_ids[i] for i in (0, 2, 4)] == expected_ids


def test_the_parser_is_reusable_after_every_kind_of_bad_document():
    decoder = RecordDecoder("json", DIM, 4096)
    good = b'{"id": "g", "x": [1, 2, 3, 4]}'
    bad = [
        b'{"x": [1, null, 3, 4]}',
        b'{"x": {"a": 1}}',
        b'{"x": [1, 2, 3, 4], "id": [1]}',
        b"[1, 2, 3, 4]",
        b"{",
    ]
    for value in bad:
        with pytest.raises(DecodeError):
            decoder.decode(record(value))
        assert decoder.decode(record(good)).record_id == "g"


def test_valid_documents_take_the_fast_path(monkeypatch):
    decoder = RecordDecoder("json", DIM, 4096, context_dim=1)

    def refuse(value: bytes) -> None:
        raise AssertionError(f"the reference decoder was called for {value!r}")

    monkeypatch.setattr(decoder, "_decode_json", refuse)
    decoded = decoder.decode(record(b'{"x": [1, 2.5, -3, 4e2], "c": [7], "id": 12}'))
    np.testing.assert_array_equal(decoded.x, np.array([1, 2.5, -3, 400], np.float32))
    np.testing.assert_array_equal(decoded.c, np.array([7], np.float32))
    assert decoded.record_id == "12"


# -- the support of the likelihood ---------------------------------------------------------------
def test_every_configurable_likelihood_has_a_support():
    for likelihood in typing.get_args(ModelSettings.model_fields["likelihood"].annotation):
        assert Support.of_likelihood(likelihood, TOTAL).origin == f"model.likelihood={likelihood}"
    with pytest.raises(ValueError, match=r"model\.likelihood"):
        Support.of_likelihood("laplace")
    with pytest.raises(ValueError, match=r"model\.binomial_total_count"):
        Support.of_likelihood("binomial")
    assert Support.of_likelihood("binomial", 5).upper == 5
    assert Support.of_likelihood("poisson", 5).upper is None  # the count applies only to the binomial
    assert "out_of_range" in DEAD_LETTER_REASONS


def vector(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


BOUNDARIES = [
    # (likelihood, x, accepted)
    ("bernoulli", vector(0, 1, 0, 1), True),
    ("bernoulli", vector(0, 0.5, 1e-7, 0.9999999), True),
    ("bernoulli", vector(0, 1, -1e-7, 1), False),
    ("bernoulli", vector(0, 1, 1.0000001, 1), False),
    ("bernoulli", vector(0, 1, 3.0, 1), False),
    ("continuous_bernoulli", vector(0, 1, 0.25, 1), True),
    ("continuous_bernoulli", vector(0, -1e-7, 0.25, 1), False),
    ("continuous_bernoulli", vector(0, 1.0000001, 0.25, 1), False),
    ("poisson", vector(0, 3, 16, 0), True),
    ("poisson", vector(0, 3, 16, 1e9), True),
    ("poisson", vector(0, 3, 2.5, 0), False),
    ("poisson", vector(0, 3, -1, 0), False),
    ("poisson", vector(0, 3, -1.5, 0), False),
    ("poisson", vector(0, 3, 16, 1e-7), False),
    ("binomial", vector(0, 3, 16, 0), True),
    ("binomial", vector(16, 16, 16, 16), True),
    ("binomial", vector(0, 3, 2.5, 0), False),
    ("binomial", vector(0, 3, 16, 1e-7), False),
    ("binomial", vector(0, -1, 16, 0), False),
    ("binomial", vector(0, 3, 17, 0), False),
    ("binomial", vector(0, 3, 16.000002, 0), False),
    ("binomial", vector(0, 3, 1e9, 0), False),
    ("gaussian", vector(-1.5, 2.5, 3.0, -1e30), True),
]


@pytest.mark.parametrize("fmt", ["json", "f32"])
@pytest.mark.parametrize(("likelihood", "x", "accepted"), BOUNDARIES)
def test_x_outside_the_likelihood_support_is_out_of_range(fmt, likelihood, x, accepted):
    decoder = RecordDecoder(fmt, DIM, 4096, support=Support.of_likelihood(likelihood, TOTAL))
    value = encode_record(x, "r", fmt)
    if accepted:
        np.testing.assert_array_equal(decoder.decode(record(value)).x, x)
    else:
        assert reason_of(decoder, value) == "out_of_range"


@pytest.mark.parametrize("fmt", ["json", "f32"])
def test_out_of_range_detail_names_the_first_index_value_and_constraint(fmt):
    decoder = RecordDecoder(fmt, DIM, 4096, support=Support.of_likelihood("poisson"))
    with pytest.raises(DecodeError) as info:
        decoder.decode(record(encode_record(vector(1, 2, 3, 2.5), "r", fmt)))
    assert info.value.detail == "x[3] = 2.5: model.likelihood=poisson needs non-negative integer counts"
    bernoulli = RecordDecoder(fmt, DIM, 4096, support=Support.of_likelihood("bernoulli"))
    with pytest.raises(DecodeError) as info:
        bernoulli.decode(record(encode_record(vector(0.5, -1e-7, 3.0, 1), "r", fmt)))
    assert info.value.detail == "x[1] = -1e-07: model.likelihood=bernoulli needs values in [0, 1]"
    binomial = RecordDecoder(fmt, DIM, 4096, support=Support.of_likelihood("binomial", 16))
    with pytest.raises(DecodeError) as info:
        binomial.decode(record(encode_record(vector(16, 0, 3, 17), "r", fmt)))
    assert info.value.detail == "x[3] = 17.0: model.likelihood=binomial needs integer counts in [0, 16]"


def test_the_default_support_is_the_real_line():
    x = vector(-1.5, 2.5, 3.0, -7)
    assert RecordDecoder("json", DIM, 4096).support == Support()
    np.testing.assert_array_equal(
        RecordDecoder("f32", DIM, 4096).decode(record(encode_record(x, "r", "f32"))).x, x
    )


@pytest.mark.parametrize("fmt", ["json", "f32"])
def test_non_finite_takes_precedence_over_out_of_range(fmt):
    decoder = RecordDecoder(fmt, DIM, 4096, support=Support.of_likelihood("poisson"))
    value = (
        encode_record(vector(2.5, np.inf, -1, 0), "r", fmt) if fmt == "f32" else b'{"x": [2.5, 1e39, -1, 0]}'
    )
    assert reason_of(decoder, value) == "non_finite"


@pytest.mark.parametrize("fmt", ["json", "f32"])
def test_the_context_is_not_held_to_the_support(fmt):
    decoder = RecordDecoder(fmt, DIM, 4096, context_dim=2, support=Support.of_likelihood("bernoulli"))
    decoded = decoder.decode(record(encode_record(vector(0, 1, 0, 1), "r", fmt, context=vector(-3, 2.5))))
    np.testing.assert_array_equal(decoded.c, vector(-3, 2.5))
    value = encode_record(vector(0, 2, 0, 1), "r", fmt, context=vector(0.5, 0.5))
    assert reason_of(decoder, value) == "out_of_range"


def test_decode_many_rejects_only_the_out_of_range_rows():
    for fmt in ("json", "f32"):
        decoder = RecordDecoder(fmt, DIM, 4096, support=Support.of_likelihood("poisson"))
        rows = [vector(0, 3, 16, 1), vector(0, 2.5, 0, 0), vector(1, 1, 1, 1), vector(-1, 0, 0, 0)]
        batch = decoder.decode_many([record(encode_record(x, f"r{i}", fmt)) for i, x in enumerate(rows)])
        assert [e.reason if e is not None else None for e in batch.errors] == [
            None,
            "out_of_range",
            None,
            "out_of_range",
        ]
        np.testing.assert_array_equal(batch.x[[0, 2]], np.stack([rows[0], rows[2]]))
        binomial = RecordDecoder(fmt, DIM, 4096, support=Support.of_likelihood("binomial", 3))
        rows = [vector(0, 3, 2, 1), vector(0, 4, 0, 0), vector(3, 3, 3, 3), vector(0, 0, 0, 16)]
        batch = binomial.decode_many([record(encode_record(x, f"r{i}", fmt)) for i, x in enumerate(rows)])
        assert [e.detail if e is not None else None for e in batch.errors] == [
            None,
            "x[1] = 4.0: model.likelihood=binomial needs integer counts in [0, 3]",
            None,
            "x[3] = 16.0: model.likelihood=binomial needs integer counts in [0, 3]",
        ]


@given(
    st.lists(
        st.floats(width=32, allow_nan=True, allow_infinity=True) | st.integers(-2, 20),
        min_size=DIM,
        max_size=DIM,
    ),
    likelihoods,
)
def test_json_and_f32_give_the_same_verdict_on_the_same_vector(values, likelihood):
    x = np.asarray(values, dtype=np.float32)
    support = Support.of_likelihood(likelihood, TOTAL)
    finite = bool(np.isfinite(x).all())
    verdicts = []
    for fmt in ("json", "f32"):
        # JSON has no NaN or infinity: a number beyond float32 range stands in for them
        value = encode_record(x, "r", fmt) if fmt == "f32" or finite else b'{"x": [1e39, 0, 0, 0]}'
        error = RecordDecoder(fmt, DIM, 4096, support=support).decode_many([record(value)]).errors[0]
        verdicts.append(("ok", "") if error is None else (error.reason, error.detail))
    assert verdicts[0][0] == verdicts[1][0]
    if verdicts[0][0] == "out_of_range":
        assert verdicts[0][1] == verdicts[1][1]
    if not finite:
        assert verdicts[0][0] == "non_finite"
    else:
        outside = reference_out_of_range(support, x) is not None
        assert verdicts[0][0] == ("out_of_range" if outside else "ok")


def test_first_violation_reports_row_index_and_value():
    support = Support.of_likelihood("bernoulli")
    x = np.stack([vector(0, 1, 0, 1), vector(0, 0.5, 0.5, 0), vector(0, 1, 1, 3)])
    assert support.first_violation(x) == (2, 3, 3.0)
    assert support.first_violation(x[:2]) is None
    binomial = Support.of_likelihood("binomial", 2)
    assert binomial.first_violation(np.stack([vector(0, 1, 2, 2), vector(2, 2, 0, 3)])) == (1, 3, 3.0)
    assert binomial.first_violation(np.stack([vector(0, 1, 2, 2)])) is None
    assert Support.of_likelihood("gaussian").first_violation(np.stack([vector(0, 0, np.nan, 0)]))[:2] == (
        0,
        2,
    )


def test_the_dead_letter_counter_has_an_out_of_range_series():
    registry = CollectorRegistry()
    Metrics(registry)
    assert registry.get_sample_value("streamvi_dead_letters_total", {"reason": "out_of_range"}) == 0.0
