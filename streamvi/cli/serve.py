"""``streamvi serve``: an encoder replica."""

from __future__ import annotations

import click

from streamvi.cli.common import CliContext, fail, pass_cli, stop_on_signals
from streamvi.errors import StreamVIError


@click.command("serve")
@click.option(
    "--max-records",
    type=click.IntRange(min=1),
    help="Stop cleanly (final flush and commit) after consuming this many records.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0.1),
    help="Stop cleanly after this many seconds without input, counted once partitions are assigned.",
)
@pass_cli
def serve(cli_ctx: CliContext, max_records: int | None, idle_timeout: float | None) -> None:
    """Encode every record of the input topic with the newest trusted snapshot; never train.

    Replicas share the input partitions in serving.group_id and publish one latents message per
    record (naming the snapshot that scored it). A replica waits for the trainer's first trusted
    snapshot in snapshots.dir (/readyz answers 503 until then) and switches to each newer one
    between two batches. SIGTERM and SIGINT stop it after a final flush and offset commit.
    """
    from streamvi.replica import build_replica

    try:
        settings = cli_ctx.settings()
        stop = stop_on_signals(settings.processing.shutdown_grace_seconds)
        daemon = build_replica(settings)
        if daemon.metrics_url:
            click.echo(f"metrics: {daemon.metrics_url}", err=True)
        counts = daemon.run(stop, max_records=max_records, idle_timeout_seconds=idle_timeout)
    except StreamVIError as exc:
        fail(exc)
    click.echo(
        f"encoded {counts.latents_published}, dead letters {counts.dead_letters} "
        f"(consumed {counts.records_consumed})",
        err=True,
    )
