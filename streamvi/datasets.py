"""Data to stream: the scikit-learn digits set (ships inside scikit-learn) and .npy/.csv/.jsonl files."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from streamvi.errors import StreamVIError

DIGITS = "digits"


@dataclass(frozen=True)
class Dataset:
    """Row vectors with optional ids, labels and context vectors."""

    x: np.ndarray
    ids: list[str]
    labels: np.ndarray | None = None
    context: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_digits() -> Dataset:
    """The 1,797 8x8 handwritten digits, pixels scaled from 0..16 to [0, 1] (64 dimensions)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    return Dataset(x=x, ids=[f"digits-{i}" for i in range(x.shape[0])], labels=bunch.target.astype(np.int64))


def load_dataset(source: str | Path) -> Dataset:
    """``digits``, or a file: .npy (2-D array), .csv (numeric rows, no header), .jsonl (objects with "x")."""
    if str(source) == DIGITS:
        return load_digits()
    path = Path(source)
    if not path.is_file():
        raise StreamVIError(f"dataset {source}: not 'digits' and no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        x = np.load(path, allow_pickle=False)
        ids = [f"{path.stem}-{i}" for i in range(len(x))]
        return Dataset(x=_matrix(x, path), ids=ids)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [[float(v) for v in row] for row in csv.reader(handle) if row]
        return Dataset(
            x=_matrix(np.asarray(rows, dtype=np.float32), path),
            ids=[f"{path.stem}-{i}" for i in range(len(rows))],
        )
    if suffix in (".jsonl", ".ndjson"):
        return _load_jsonl(path)
    raise StreamVIError(f"dataset {path}: unsupported file type {suffix!r} (use .npy, .csv or .jsonl)")


def _matrix(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim != 2:
        raise StreamVIError(f"dataset {path}: expected a 2-D array of rows, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _load_jsonl(path: Path) -> Dataset:
    rows: list[list[float]] = []
    ids: list[str] = []
    labels: list[object] = []
    contexts: list[list[float]] = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
                rows.append([float(v) for v in doc["x"]])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise StreamVIError(
                    f"dataset {path}, line {number}: expected an object with 'x': {exc}"
                ) from exc
            ids.append(str(doc.get("id", f"{path.stem}-{len(ids)}")))
            labels.append(doc.get("label"))
            if "c" in doc:
                contexts.append([float(v) for v in doc["c"]])
    x = _matrix(np.asarray(rows, dtype=np.float32), path)
    label_array = np.asarray(labels) if all(v is not None for v in labels) and labels else None
    context = np.asarray(contexts, dtype=np.float32) if len(contexts) == len(rows) and contexts else None
    return Dataset(x=x, ids=ids, labels=label_array, context=context)


def encode_record(
    x: np.ndarray, record_id: str, fmt: str, label: int | None = None, context: np.ndarray | None = None
) -> bytes:
    """One input record value in the wire format ``fmt`` (json or f32; f32 appends the context)."""
    if fmt == "f32":
        values = x if context is None else np.concatenate([x, context])
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    document: dict[str, object] = {"id": record_id, "x": np.asarray(x, dtype=np.float32)}
    if context is not None:
        document["c"] = np.asarray(context, dtype=np.float32)
    if label is not None:
        document["label"] = int(label)
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
