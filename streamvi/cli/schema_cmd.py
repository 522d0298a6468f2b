"""``streamvi schema infer``: a starting feature schema from a sample of events."""

from __future__ import annotations

import click

from streamvi.cli.common import fail
from streamvi.errors import StreamVIError


@click.group("schema")
def schema_group() -> None:
    """Feature schemas for events with named fields (input.features)."""


@schema_group.command("infer")
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSON lines, one event each.",
)
@click.option(
    "--max-vocabulary",
    type=click.IntRange(min=2),
    default=50,
    show_default=True,
    help="Strings with more distinct values than this are hashed rather than given a vocabulary.",
)
def infer(input_path: str, max_vocabulary: int) -> None:
    """Print an input.features section (YAML) for the sample: types, vocabularies and ranges seen."""
    from streamvi.features.infer import infer_schema

    try:
        with open(input_path, "rb") as handle:
            text = infer_schema(handle, max_vocabulary)
    except OSError as exc:
        fail(StreamVIError(f"{input_path}: {exc.strerror or exc}"))
    except StreamVIError as exc:
        fail(StreamVIError(f"{input_path}: {exc}"))
    click.echo(text, nl=False)
