"""A starting feature schema from a sample of events: types, vocabularies and ranges per field.

Every leaf of the sample's objects (nested objects give dotted paths) becomes a feature: only
true/false (or 0/1) is ``binary``; non-negative integers are ``count``; other numbers ``numeric``;
strings with at most ``max_vocabulary`` distinct values ``categorical`` (by frequency), more
``hashed``. Arrays are left out. Fields missing from some events get ``missing: mask``. It is a
start: read it, and fix what the sample could not tell (an integer code that is not a count).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import yaml

from streamvi.errors import StreamVIError

_SKIPPED = ("id",)


@dataclass
class FieldSample:
    """What the sample showed of one path."""

    seen: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    values: Counter[Any] = field(default_factory=Counter)
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, value: Any) -> None:
        self.seen += 1
        kind = "bool" if isinstance(value, bool) else type(value).__name__
        self.kinds[kind] += 1
        if kind in ("int", "float"):
            self.low, self.high = min(self.low, value), max(self.high, value)
        if kind in ("str", "int", "bool") and len(self.values) <= 10_000:
            self.values[value] += 1


def _leaves(document: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in document.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, f"{path}.")
        elif value is not None and not isinstance(value, list):
            yield path, value


def sample_fields(lines: Iterable[bytes]) -> tuple[int, dict[str, FieldSample]]:
    """(events read, per path what was seen); a line that is not a JSON object is an error."""
    fields: dict[str, FieldSample] = {}
    events = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            document = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise StreamVIError(f"line {number}: not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise StreamVIError(f"line {number}: expected a JSON object")
        events += 1
        for path, value in _leaves(document):
            if path not in _SKIPPED:
                fields.setdefault(path, FieldSample()).add(value)
    return events, fields


def _feature(path: str, sample: FieldSample, events: int, max_vocabulary: int) -> tuple[dict[str, Any], str]:
    """The feature for one path, and a comment saying what the sample showed."""
    spec: dict[str, Any] = {"name": path.replace(".", "_"), "path": path}
    kinds = set(sample.kinds)
    share = f"in {sample.seen}/{events} events"
    numbers = kinds <= {"int", "float", "bool"}
    if kinds == {"bool"} or (kinds <= {"int", "bool"} and set(sample.values) <= {0, 1}):
        spec["type"], note = "binary", share
    elif numbers and "float" not in kinds and sample.low >= 0:
        spec["type"], note = "count", f"{share}, range [{sample.low:g}, {sample.high:g}]"
    elif numbers:
        spec["type"], note = "numeric", f"{share}, range [{sample.low:g}, {sample.high:g}]"
    elif kinds <= {"str", "int"} and len(sample.values) <= max_vocabulary:
        spec["type"] = "categorical"
        spec["vocabulary"] = [value for value, _ in sample.values.most_common()]
        note = f"{share}, {len(sample.values)} values"
    else:
        buckets = 1 << max(4, min(12, (2 * len(sample.values)).bit_length()))
        spec.update(type="hashed", buckets=buckets)
        note = f"{share}, {len(sample.values)}+ distinct values of {', '.join(sorted(kinds))}"
    if spec["type"] == "categorical" and len(spec["vocabulary"]) < 2:
        spec.update(type="hashed", buckets=16)
        spec.pop("vocabulary")
    spec["missing"] = "mask"
    spec["malformed"] = "dead_letter"
    return spec, note


def infer_schema(lines: Iterable[bytes], max_vocabulary: int = 50) -> str:
    """A YAML ``input.features`` section for the sample, each feature with a comment on what was seen."""
    events, fields = sample_fields(lines)
    if not fields:
        raise StreamVIError("the sample holds no fields to use (no events, or only arrays and ids)")
    out = [f"# inferred from {events} events: check each type before training on it", "input:", "  features:"]
    for path, sample in fields.items():
        spec, note = _feature(path, sample, events, max_vocabulary)
        text = yaml.safe_dump([spec], default_flow_style=None, sort_keys=False, width=200).strip()
        out.append(f"    # {path}: {note}")
        out.extend(f"    {line}" for line in text.splitlines())
    return "\n".join(out) + "\n"
