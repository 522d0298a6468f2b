"""``streamvi produce``: feed a dataset into a topic."""

from __future__ import annotations

import io

import click
from kafka.errors import KafkaError

from streamvi.cli.common import CliContext, fail, pass_cli
from streamvi.errors import StreamVIError


@click.command("produce")
@click.option(
    "--dataset",
    default="digits",
    show_default=True,
    help="'digits' (scikit-learn's 8x8 digits, scaled to [0,1]) or a .npy/.csv/.jsonl file.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["json", "f32"]), help="Wire format [default: input.format]."
)
@click.option("--topic", help="Target topic [default: kafka.input_topic].")
@click.option(
    "--repeat", type=click.IntRange(min=1), default=1, show_default=True, help="Passes over the data."
)
@click.option("--limit", type=click.IntRange(min=1), help="Send at most this many records.")
@click.option(
    "--rate", type=click.FloatRange(min=0.001), help="Records per second (default: as fast as possible)."
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@pass_cli
def produce(
    cli_ctx: CliContext,
    dataset: str,
    fmt: str | None,
    topic: str | None,
    repeat: int,
    limit: int | None,
    rate: float | None,
    progress: bool,
) -> None:
    """Send a dataset to Kafka, one record per row, keyed by record id."""
    from streamvi.datasets import load_dataset
    from streamvi.io.admin import ensure_topics
    from streamvi.io.producer import produce_dataset

    try:
        settings = cli_ctx.settings()
        data = load_dataset(dataset)
        target = topic or settings.kafka.input_topic
        if settings.kafka.create_topics:
            ensure_topics(settings.kafka, [target])
        total = len(data) * repeat if limit is None else min(limit, len(data) * repeat)
        with click.progressbar(
            length=total, label=f"producing to {target}", file=None if progress else io.StringIO()
        ) as bar:
            sent = produce_dataset(
                settings.kafka, data, target, fmt or settings.input.format, repeat, limit, rate, bar.update
            )
    except KafkaError as exc:
        fail(settings.kafka.failure(exc))
    except StreamVIError as exc:
        fail(exc)
    click.echo(f"sent {sent} records to {target}", err=True)
