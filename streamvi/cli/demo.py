"""``streamvi demo``: the whole product on an embedded broker, in one command."""

from __future__ import annotations

from pathlib import Path

import click

from streamvi.cli.common import CliContext, fail, pass_cli
from streamvi.errors import StreamVIError


@click.command("demo")
@click.option(
    "--passes", type=click.IntRange(min=1), default=10, show_default=True, help="Passes over the digits."
)
@click.option("--workdir", type=click.Path(file_okay=False), help="Where snapshots and the broker log go.")
@click.option(
    "--linger", type=click.FloatRange(min=0), default=0.0, help="Keep /metrics up this long at the end."
)
@pass_cli
def demo(cli_ctx: CliContext, passes: int, workdir: str | None, linger: float) -> None:
    """Start the embedded broker, stream the digits set through the daemon, print a summary, stop it all."""
    from streamvi.demo import run_demo

    try:
        run_demo(cli_ctx.settings(), passes, Path(workdir) if workdir else None, linger, click.echo)
    except StreamVIError as exc:
        fail(exc)
