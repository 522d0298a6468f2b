"""``streamvi report``: PNG plots of a snapshot's training history, latent space and reconstructions."""

from __future__ import annotations

import click

from streamvi.cli.common import fail
from streamvi.errors import StreamVIError


@click.command("report")
@click.option(
    "--snapshot",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="A snapshot directory, or a snapshots directory (its newest valid snapshot is used).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the PNG files.")
@click.option(
    "--input",
    "input_path",
    help="Records to encode for the latent and reconstruction plots: a .npy/.csv/.jsonl file or "
    "'digits' (labels from a .jsonl 'label' field colour the latent plot); for a feature-schema "
    "snapshot, raw events as `streamvi encode` reads them. Without it, the held-out records the "
    "snapshot keeps (snapshots.sample_records) are encoded.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=2000, show_default=True, help="Records to encode at most."
)
def report(snapshot: str, out: str, input_path: str | None, limit: int) -> None:
    """Write history.png (ELBO, KL and reconstruction per step), latents.png (posterior means in
    2-D) and reconstructions.png (inputs beside their reconstructions), from the snapshot alone or
    from --input."""
    from streamvi.cli.encode import load_events
    from streamvi.datasets import load_dataset
    from streamvi.report import describe, write_report
    from streamvi.snapshots.loading import find_snapshot, settings_of

    try:
        info = find_snapshot(snapshot)
        data = None
        if input_path is not None:
            settings = settings_of(info)
            with_features = settings.input.features is not None
            data = load_events(settings, input_path) if with_features else load_dataset(input_path)
        result = write_report(info, out, data, limit=limit)
    except StreamVIError as exc:
        fail(exc)
    click.echo(describe(result.files, result))
