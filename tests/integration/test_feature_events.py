"""A feature-schema stream through the daemon on the embedded broker: named-field events with
values missing and a categorical field, JSON or Avro behind the Confluent wire header. Good records
get latents that say how much was observed, malformed ones are dead letters naming the field, and
``streamvi encode`` on the same raw events with a snapshot gives the latents that snapshot scored."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import orjson
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from streamvi.cli.main import cli
from streamvi.features.avro import encode_avro
from streamvi.io.admin import ensure_topics
from streamvi.io.codecs import HEADER_DETAIL, HEADER_REASON
from streamvi.runtime import build_daemon
from streamvi.snapshots import SnapshotStore
from tests.integration.conftest import produce_values, read_topic
from tests.unit import feature_events

pytestmark = pytest.mark.integration

SCHEMA_ID = 11
GOOD = 320
MORE = 40
#: What the dead letter of each malformed event must say: (id, reason, text naming the field).
MALFORMED = [
    ("bad-category", "unknown_category", "feature diagnosis"),
    ("bad-missing", "missing_field", "feature mean_radius (path mean.radius)"),
]


def malformed(event: dict[str, Any]) -> list[dict[str, Any]]:
    """Copies of a good ``event`` with one thing wrong each, in MALFORMED's order."""
    without_radius = {**event, "mean": {k: v for k, v in event["mean"].items() if k != "radius"}}
    return [{**event, "diagnosis": "unknown"}, without_radius]


def observed_count(event: dict[str, Any]) -> int:
    """How many of the schema's 31 features ``event`` carries."""
    return sum(len(v) if isinstance(v, dict) else 1 for k, v in event.items() if k != "id")


def write_input(events: list[dict[str, Any]], fmt: str, path: Path) -> Path:
    """``events`` as a file ``streamvi encode`` reads: JSON lines, or an Avro container file."""
    if fmt == "json":
        path = path.with_suffix(".jsonl")
        path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    else:
        path = path.with_suffix(".avro")
        with path.open("wb") as handle:
            fastavro.writer(handle, fastavro.parse_schema(feature_events.avro_schema()), events)
    return path


def feature_settings(settings_factory, tmp_path: Path, fmt: str):
    """Settings for the events' schema (``mean.radius`` required) on the session broker."""
    features = feature_events.schema()
    features[0]["missing"] = "dead_letter"  # mean.radius: an event without it is a dead letter
    overrides = [
        f"input.features={orjson.dumps(features).decode()}",
        "input.normalise_warmup=64",
        "training.jit_compile=false",
        "snapshots.every_steps=3",
        "snapshots.keep=10",
    ]
    if fmt == "avro":
        schema_file = tmp_path / "patient.avsc"
        schema_file.write_bytes(orjson.dumps(feature_events.avro_schema()))
        overrides += ["input.format=avro", f"input.avro_schema_ids={{{SCHEMA_ID}: {schema_file}}}"]
    return settings_factory(*overrides)


def value_encoder(fmt: str) -> Callable[[dict[str, Any]], bytes]:
    """An event as the record value a producer sends: JSON, or Avro behind the wire header."""
    if fmt == "json":
        return orjson.dumps
    schema = fastavro.parse_schema(feature_events.avro_schema())
    return lambda event: encode_avro(schema, event, SCHEMA_ID)


def bad_records(
    fmt: str, event: dict[str, Any]
) -> tuple[list[tuple[bytes, bytes]], list[tuple[str, str, str]]]:
    """Malformed records made from a good ``event``, and what their dead letters must say."""
    encode = value_encoder(fmt)
    bad = [
        (name.encode(), encode({**e, "id": name}))
        for e, (name, _, _) in zip(malformed(event), MALFORMED, strict=True)
    ]
    if fmt == "json":  # a value of the wrong type
        bad.append((b"bad-type", orjson.dumps({**event, "id": "bad-type", "mean": {"radius": "large"}})))
        return bad, [*MALFORMED, ("bad-type", "wrong_type", "feature mean_radius (path mean.radius)")]
    # a datum cut short inside the (nullable) mean record
    bad.append((b"bad-datum", encode({**event, "id": "bad-datum"})[:18]))
    return bad, [*MALFORMED, ("bad-datum", "schema_mismatch", "field mean")]


def encode_scored(
    snapshot: Path, scored: list[dict[str, Any]], events: list[dict[str, Any]], fmt: str, path: Path
):
    """``streamvi encode`` with ``snapshot`` on the raw events of the latents ``scored``."""
    by_id = {e["id"]: e for e in events}
    path = write_input([by_id[m["id"]] for m in scored], fmt, path)
    result = CliRunner().invoke(cli, ["encode", "--snapshot", str(snapshot), "--input", str(path)])
    assert result.exit_code == 0, result.output
    return [orjson.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("fmt", ["json", "avro"])
def test_feature_events_through_the_daemon(settings_factory, tmp_path, fmt):
    settings = feature_settings(settings_factory, tmp_path, fmt)
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers[0]
    ensure_topics(kafka)
    events = [e for e in feature_events.events(seed=3) if "radius" in e.get("mean", {})][: GOOD + MORE]
    encode = value_encoder(fmt)
    good = [(e["id"].encode(), encode(e)) for e in events]
    bad, expected = bad_records(fmt, events[0])
    produce_values(bootstrap, kafka.input_topic, good[:100] + bad + good[100:GOOD])
    counts = build_daemon(settings, CollectorRegistry()).run(max_records=GOOD + len(bad))
    assert counts.records_trained == GOOD and counts.dead_letters == len(bad)
    final = SnapshotStore(settings.snapshots.dir).latest()
    assert final is not None and final.step == counts.steps

    # a second run resumes from that snapshot and scores its first batch with it
    produce_values(bootstrap, kafka.input_topic, good[GOOD:])
    build_daemon(settings, CollectorRegistry()).run(max_records=MORE)
    latents = [orjson.loads(m.value) for m in read_topic(bootstrap, kafka.latents_topic, GOOD + MORE)]
    observed = {e["id"]: observed_count(e) for e in events}
    assert sorted(m["id"] for m in latents) == sorted(observed)
    assert all(m["observed"] == observed[m["id"]] for m in latents)
    assert min(observed.values()) < 31  # some values were missing

    letters = {m.key: dict(m.headers) for m in read_topic(bootstrap, kafka.dead_letter_topic, len(bad))}
    assert sorted(letters) == sorted(k for k, _ in bad)
    for name, reason, names in expected:
        assert letters[name.encode()][HEADER_REASON].decode() == reason
        assert names in letters[name.encode()][HEADER_DETAIL].decode()

    # every record scored by a snapshot still kept (the final one of the first run among them) is
    # encoded offline by that snapshot as the daemon encoded it: z is the same float32 network on
    # the same decoded rows (equal to the bit here; 1e-6 allowed), and the ELBO a one-draw Monte
    # Carlo estimate seeded from the snapshot's RNG state and step, so the same draw, summed in
    # another order (6e-7 nats seen; 1e-5 + 1e-6 relative allowed). Records scored by a model
    # between snapshots have no snapshot to compare with.
    compared = set()
    for info in SnapshotStore(settings.snapshots.dir).valid():
        scored = [m for m in latents if m["model_step"] == info.step]
        if scored:
            encoded = encode_scored(info.path, scored, events, fmt, tmp_path / f"scored-{info.step}")
            assert [e["id"] for e in encoded] == [m["id"] for m in scored]
            for key in ("z_mean", "z_scale"):
                np.testing.assert_allclose(
                    [e[key] for e in encoded], [m[key] for m in scored], rtol=0, atol=1e-6
                )
            np.testing.assert_allclose(
                [e["elbo"] for e in encoded], [m["elbo"] for m in scored], rtol=1e-6, atol=1e-5
            )
            compared.update((info.step, m["id"]) for m in scored)
    assert {step for step, _ in compared} >= {final.step} and len(compared) >= 2 * 32
