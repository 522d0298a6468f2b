"""``streamvi encode``: offline encodings and per-record ELBO from a snapshot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import click
import numpy as np
import orjson

from streamvi.cli.common import fail
from streamvi.errors import StreamVIError

if TYPE_CHECKING:
    from streamvi.config import Settings
    from streamvi.datasets import Dataset
    from streamvi.features.avro import AvroReader
    from streamvi.io.codecs import Support


@click.command("encode")
@click.option(
    "--snapshot",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="A snapshot directory, or a snapshots directory (its newest valid snapshot is used).",
)
@click.option(
    "--input",
    "input_path",
    required=True,
    help=(
        "A .npy/.csv/.jsonl file, or 'digits'; for a feature-schema snapshot, raw events: JSON lines "
        "(.jsonl), or an Avro object container file (.avro) when its input.format is avro."
    ),
)
@click.option("--output", type=click.File("wb"), default="-", help="JSON lines out [default: stdout].")
@click.option(
    "--importance-samples",
    type=click.IntRange(min=1),
    help="Also estimate log p(x) per record with this many importance samples (IWAE-k).",
)
def encode(snapshot: str, input_path: str, output: BinaryIO, importance_samples: int | None) -> None:
    """Write one JSON line per input row: id, z_mean, z_scale and the bound under the snapshot's model."""
    from streamvi.datasets import load_dataset
    from streamvi.snapshots.loading import find_snapshot, load_trainer

    try:
        info = find_snapshot(snapshot)
        settings, trainer = load_trainer(info)
        if settings.input.features is not None:
            data = load_events(settings, input_path)
        else:
            data = load_dataset(input_path)
            _check_vectors(input_path, data, settings)
        scores = trainer.evaluate(data.x, data.context)
        log_likelihood = (
            trainer.log_likelihood(data.x, data.context, importance_samples) if importance_samples else None
        )
    except StreamVIError as exc:
        fail(exc)
    out = output if output is not None else sys.stdout.buffer
    option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    for i, record_id in enumerate(data.ids):
        row: dict[str, object] = {
            "id": record_id,
            "model_step": info.step,
            "bound": trainer.estimator.bound_name,
            "z_mean": scores.z_loc[i],
            "z_scale": scores.z_scale[i],
            "elbo": float(scores.bound[i]),
        }
        if settings.input.features is not None:  # the bound is on the observed dimensions
            row["observed"] = int(np.count_nonzero(~np.isnan(data.x[i])))
        if log_likelihood is not None:
            row["log_likelihood"] = float(log_likelihood[i])
            row["importance_samples"] = importance_samples
        out.write(orjson.dumps(row, option=option))


def _check_vectors(input_path: str, data: Dataset, settings: Settings) -> None:
    """Model-ready rows must have the model's width, a context if it takes one, and lie in the support."""
    from streamvi.io.codecs import Support

    if data.x.shape[1] != settings.input.dim:
        raise StreamVIError(
            f"{input_path}: rows have {data.x.shape[1]} values, "
            f"the snapshot's model expects {settings.input.dim}"
        )
    if data.context is None and settings.input.context_dim:
        raise StreamVIError(f"{input_path}: the snapshot's model needs a context 'c' per record")
    support = Support.of_likelihood(settings.model.likelihood, settings.model.binomial_total_count)
    _check_support(input_path, data, support)


def load_events(settings: Settings, input_path: str) -> Dataset:
    """Raw events under the snapshot's feature schema: JSON lines, or with ``input.format=avro``
    an Avro object container file. Every record goes through the daemon's decoder, so one it would
    dead-letter is an error naming the line (or record) and the reason."""
    from streamvi.datasets import Dataset
    from streamvi.features.decoder import FeatureDecoder
    from streamvi.io.base import RawRecord
    from streamvi.runtime import build_decoder

    decoder = build_decoder(settings)
    assert isinstance(decoder, FeatureDecoder)  # the settings have input.features
    unit = "line" if decoder.avro is None else "record"
    values = _json_lines(input_path) if decoder.avro is None else _avro_values(decoder.avro, input_path)
    records = [RawRecord("file", 0, i, None, value) for i, value in enumerate(values)]
    batch = decoder.decode_many(records)
    for number, error in enumerate(batch.errors, start=1):
        if error is not None:
            raise StreamVIError(f"{input_path}, {unit} {number}: {error.reason}: {error.detail}")
    ids = [record_id or f"{unit}-{i + 1}" for i, record_id in enumerate(batch.record_ids)]
    return Dataset(x=batch.x, ids=ids)


def _json_lines(input_path: str) -> list[bytes]:
    """The non-blank lines of a JSON-lines file, each one record value."""
    try:
        with open(input_path, "rb") as handle:
            return [line.rstrip(b"\r\n") for line in handle if line.strip()]
    except OSError as exc:
        raise StreamVIError(f"{input_path}: {exc.strerror or exc}") from exc


def _avro_values(reader: AvroReader, input_path: str) -> list[bytes]:
    """The records of an Avro container file as the daemon would receive them (see container_values)."""
    from streamvi.features.avro import container_values

    try:
        return container_values(Path(input_path), reader)
    except ValueError as exc:
        raise StreamVIError(f"{input_path}: {exc}") from exc


def _check_support(input_path: str, data: Dataset, support: Support) -> None:
    """Refuse rows the snapshot's likelihood has no density for: their bound would mean nothing."""
    violation = support.first_violation(data.x)
    if violation is not None:
        row, index, value = violation
        raise StreamVIError(
            f"{input_path}: row {row + 1} (id {data.ids[row]!r}): {support.violation_detail(index, value)}"
        )
