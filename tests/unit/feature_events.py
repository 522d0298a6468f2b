"""scikit-learn's breast-cancer set as named-field JSON events: 30 numeric features on scales from
1e-3 to 1e3 nested by statistic (``mean.radius``, ``error.texture``, ``worst.area``, ...), the
diagnosis as a categorical field, and a share of values removed at random."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from streamvi.io.base import RawRecord

DIAGNOSES = ["malignant", "benign"]


def feature_paths() -> list[str]:
    """The dotted path of each of the 30 numeric features, in the data set's column order."""
    from sklearn.datasets import load_breast_cancer

    paths = []
    for name in load_breast_cancer().feature_names:
        statistic, _, measure = str(name).partition(" ")
        if statistic not in ("mean", "worst"):  # "radius error" and the like
            measure, statistic = str(name).rsplit(" ", 1)
        paths.append(f"{statistic}.{measure.replace(' ', '_')}")
    return paths


def schema() -> list[dict[str, Any]]:
    """The feature schema of the events: every numeric feature masked when missing, plus the diagnosis."""
    numeric = [{"name": path.replace(".", "_"), "path": path, "type": "numeric"} for path in feature_paths()]
    return [*numeric, {"name": "diagnosis", "type": "categorical", "vocabulary": DIAGNOSES}]


def avro_schema() -> dict[str, Any]:
    """The events' Avro schema: a record per statistic, every value (and record) nullable, and the
    diagnosis a string (so that a value outside the vocabulary can be sent, as in JSON)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for path in feature_paths():
        group, key = path.split(".")
        groups.setdefault(group, []).append({"name": key, "type": ["null", "double"], "default": None})
    fields: list[dict[str, Any]] = [{"name": "id", "type": "string"}]
    for group, members in groups.items():
        record = {"type": "record", "name": group.capitalize(), "fields": members}
        fields.append({"name": group, "type": ["null", record], "default": None})
    fields.append({"name": "diagnosis", "type": ["null", "string"], "default": None})
    return {"type": "record", "name": "Patient", "fields": fields}


def events(missing: float = 0.1, seed: int = 0) -> list[dict[str, Any]]:
    """One event per patient; each value (the diagnosis too) is left out with probability ``missing``."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    rng = np.random.default_rng(seed)
    paths = feature_paths()
    out = []
    for i, (row, label) in enumerate(zip(data.data, data.target, strict=True)):
        event: dict[str, Any] = {"id": f"bc-{i}"}
        for path, value in zip(paths, row, strict=True):
            if rng.random() < missing:
                continue
            group, key = path.split(".")
            event.setdefault(group, {})[key] = float(value)
        if rng.random() >= missing:
            event["diagnosis"] = DIAGNOSES[int(label)]
        out.append(event)
    return out


def records(events_: list[dict[str, Any]], passes: int = 1, topic: str = "in") -> list[RawRecord]:
    """The events as JSON input records, ``passes`` times over, in one partition."""
    values = [orjson.dumps(e) for e in events_]
    return [
        RawRecord(
            topic, 0, offset, events_[offset % len(values)]["id"].encode(), values[offset % len(values)]
        )
        for offset in range(passes * len(values))
    ]
