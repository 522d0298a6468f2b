"""``streamvi run``: the daemon."""

from __future__ import annotations

import click

from streamvi.cli.common import CliContext, fail, pass_cli, stop_on_signals
from streamvi.errors import StreamVIError


@click.command("run")
@click.option(
    "--max-records",
    type=click.IntRange(min=1),
    envvar="STREAMVI_MAX_RECORDS",
    help="Stop cleanly (final snapshot and commit) after consuming this many records.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0.1),
    help="Stop cleanly after this many seconds without input, counted once partitions are assigned.",
)
@pass_cli
def run(cli_ctx: CliContext, max_records: int | None, idle_timeout: float | None) -> None:
    """Consume the input topic, train the VAE online, publish latents and metrics, snapshot, commit.

    SIGTERM and SIGINT stop it after a final flush, snapshot and offset commit, within
    processing.shutdown_grace_seconds (exit status 3 if that runs out).
    """
    from streamvi.runtime import build_daemon

    try:
        settings = cli_ctx.settings()
        stop = stop_on_signals(settings.processing.shutdown_grace_seconds)
        daemon = build_daemon(settings)
        if daemon.metrics_url:
            click.echo(f"metrics: {daemon.metrics_url}", err=True)
        consumed_before = daemon.loop.counts.records_consumed
        counts = daemon.run(stop, max_records=max_records, idle_timeout_seconds=idle_timeout)
    except StreamVIError as exc:
        fail(exc)
    click.echo(
        f"this run consumed {counts.records_consumed - consumed_before}; totals: "
        f"trained {counts.records_trained}, dead letters {counts.dead_letters}, steps {counts.steps}",
        err=True,
    )
