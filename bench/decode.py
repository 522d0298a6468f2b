"""Decode cost per record under a feature schema: a 30-field JSON event and its Avro form, against
orjson alone parsing the same JSON bytes. Prints one JSON object.

Each figure is the best of ``--repeats`` runs over ``--records`` records decoded a fetch at a time
(``--fetch`` records), in microseconds per record, on one thread; the three runs take turns in
each repeat so that they share the machine's load.

    python bench/decode.py [--records 20000] [--fetch 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import orjson

from streamvi.features.avro import encode_avro, load_schema
from streamvi.features.decoder import FeatureDecoder
from streamvi.features.schema import FeatureSpec
from streamvi.io.base import RawRecord

NUMERIC = 24
KINDS = ["web", "batch", "stream", "cron"]


def schema() -> tuple[list[FeatureSpec], dict[str, Any]]:
    """30 features (24 numeric, nested in three groups, 2 binary, 2 counts, a categorical, a hashed
    host) and the Avro record schema that carries them (numerics nullable, as events often are)."""
    features = [FeatureSpec(name=f"m{i}", path=f"g{i % 3}.m{i}") for i in range(NUMERIC)]
    features += [FeatureSpec(name=f"flag{i}", type="binary") for i in range(2)]
    features += [FeatureSpec(name=f"count{i}", type="count") for i in range(2)]
    features += [
        FeatureSpec(name="kind", type="categorical", vocabulary=KINDS),
        FeatureSpec(name="host", type="hashed", buckets=64),
    ]
    groups = [
        {
            "name": f"g{g}",
            "type": {
                "type": "record",
                "name": f"G{g}",
                "fields": [
                    {"name": f"m{i}", "type": ["null", "double"], "default": None}
                    for i in range(NUMERIC)
                    if i % 3 == g
                ],
            },
        }
        for g in range(3)
    ]
    avro = {
        "type": "record",
        "name": "Event",
        "fields": [
            {"name": "id", "type": "string"},
            *groups,
            *({"name": f"flag{i}", "type": "boolean"} for i in range(2)),
            *({"name": f"count{i}", "type": "long"} for i in range(2)),
            {"name": "kind", "type": "string"},
            {"name": "host", "type": "string"},
        ],
    }
    return features, avro


def events(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        event: dict[str, Any] = {"id": f"e{i}", "g0": {}, "g1": {}, "g2": {}}
        for j in range(NUMERIC):
            value = float(rng.normal() * 10.0 ** rng.integers(-3, 4))
            event[f"g{j % 3}"][f"m{j}"] = None if rng.random() < 0.05 else value
        event.update(flag0=bool(rng.random() < 0.5), flag1=bool(rng.random() < 0.1))
        event.update(count0=int(rng.poisson(3)), count1=int(rng.poisson(30)))
        event.update(kind=KINDS[int(rng.integers(4))], host=f"host-{int(rng.integers(500))}")
        out.append(event)
    return out


def best_microseconds(runs: list[Callable[[], object]], records: int, repeats: int) -> list[float]:
    """Best time per record of each run; the runs take turns within each repeat, so on a shared
    machine they see the same load and their ratios stay comparable."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, spent in zip(runs, times, strict=True):
            started = time.perf_counter()
            run()
            spent.append(time.perf_counter() - started)
    return [min(spent) / records * 1e6 for spent in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--fetch", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    features, avro_schema = schema()
    sample = events(args.records)
    json_values = [orjson.dumps(e) for e in sample]
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "event.avsc"
        path.write_text(json.dumps(avro_schema))
        parsed = load_schema(path)
        avro_values = [encode_avro(parsed, e) for e in sample]
        json_decoder = FeatureDecoder(features, "json")
        avro_decoder = FeatureDecoder(features, "avro", avro_schema=path)

        def fetches(values: list[bytes]) -> list[list[RawRecord]]:
            records = [RawRecord("in", 0, i, None, v) for i, v in enumerate(values)]
            return [records[i : i + args.fetch] for i in range(0, len(records), args.fetch)]

        json_fetches, avro_fetches = fetches(json_values), fetches(avro_values)
        checked = json_decoder.decode_many(json_fetches[0])
        assert checked.all_valid and avro_decoder.decode_many(avro_fetches[0]).all_valid

        def orjson_only() -> None:
            for value in json_values:
                orjson.loads(value)

        def decode(decoder: FeatureDecoder, batches: list[list[RawRecord]]) -> Callable[[], None]:
            return lambda: [decoder.decode_many(batch) for batch in batches] and None

        orjson_us, json_us, avro_us = best_microseconds(
            [orjson_only, decode(json_decoder, json_fetches), decode(avro_decoder, avro_fetches)],
            args.records,
            args.repeats,
        )
    print(
        json.dumps(
            {
                "benchmark": "feature_decode",
                "fields": len(features),
                "records": args.records,
                "fetch": args.fetch,
                "json_bytes_per_record": round(float(np.mean([len(v) for v in json_values])), 1),
                "avro_bytes_per_record": round(float(np.mean([len(v) for v in avro_values])), 1),
                "orjson_parse_us_per_record": round(orjson_us, 3),
                "json_decode_us_per_record": round(json_us, 3),
                "avro_decode_us_per_record": round(avro_us, 3),
                "json_vs_orjson": round(json_us / orjson_us, 2),
                "avro_vs_orjson": round(avro_us / orjson_us, 2),
                "target_vs_orjson": 2.0,
            }
        )
    )


if __name__ == "__main__":
    main()
