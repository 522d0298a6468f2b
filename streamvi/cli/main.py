"""The ``streamvi`` command: run, produce, demo, encode, report, snapshots, config, schema."""

from __future__ import annotations

import click

from streamvi import __version__
from streamvi.cli.common import CliContext, configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="STREAMVI_CONFIG",
    help="YAML config file (env STREAMVI_CONFIG). Settings also come from STREAMVI_<SECTION>__<KEY>.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one setting; repeatable; wins over the file and the environment.",
)
@click.option(
    "--log-level",
    default="INFO",
    envvar="STREAMVI_LOG_LEVEL",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    show_default=True,
)
@click.version_option(__version__, prog_name="streamvi")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, overrides: tuple[str, ...], log_level: str) -> None:
    """Learn a variational autoencoder online from a Kafka stream."""
    configure_logging(log_level)
    ctx.obj = CliContext(config_path, list(overrides))


def _register() -> None:
    from streamvi.cli.config_cmd import config_group
    from streamvi.cli.demo import demo
    from streamvi.cli.encode import encode
    from streamvi.cli.produce import produce
    from streamvi.cli.report import report
    from streamvi.cli.run import run
    from streamvi.cli.schema_cmd import schema_group
    from streamvi.cli.snapshots import snapshots_group

    for command in (run, produce, demo, encode, report, snapshots_group, config_group, schema_group):
        cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="streamvi")


if __name__ == "__main__":
    main()
