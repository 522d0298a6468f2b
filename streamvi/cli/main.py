"""The ``streamvi`` command: run, serve, produce, demo, encode, report, snapshots, config, schema."""

from __future__ import annotations

import click

from streamvi import __version__
from streamvi.cli.common import CliContext
from streamvi.cli.logs import configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="STREAMVI_CONFIG",
    help="YAML config file (env STREAMVI_CONFIG). Settings also come from STREAMVI_<SECTION>__<KEY>. "
    "--config, --set and --log-level may also follow the subcommand.",
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
    from streamvi.cli.serve import serve
    from streamvi.cli.snapshots import snapshots_group

    for command in (run, serve, produce, demo, encode, report, snapshots_group, config_group, schema_group):
        cli.add_command(command)


def _after_subcommand(ctx: click.Context, param: click.Parameter, value: object) -> None:
    """A shared option given after a subcommand: applied as if given before it, after those that
    were (so it wins over them, and its --set values come last)."""
    cli_ctx = ctx.find_object(CliContext)
    if cli_ctx is None or value is None or value == ():
        return
    if param.name == "config_path":
        cli_ctx.config_path = str(value)
    elif param.name == "overrides":
        cli_ctx.overrides.extend(str(item) for item in value)  # type: ignore[attr-defined]
    elif param.name == "log_level":
        configure_logging(str(value))


#: Help of the shared options where they follow a subcommand.
_AFTER_HELP = {
    "config_path": "YAML config file, as before the subcommand (wins over one given there).",
    "overrides": "Override one setting, as before the subcommand; repeatable; applied after those "
    "given there.",
    "log_level": "Log level, as before the subcommand (wins over one given there).",
}


def _shared_options(command: click.Command) -> list[click.Option]:
    """The group's --config, --set and --log-level for a subcommand, without environment defaults
    (the environment is read once, before the subcommand)."""
    options = []
    for option in cli.params:
        if not isinstance(option, click.Option) or option.name not in _AFTER_HELP:
            continue
        if any(opt in other.opts for other in command.params for opt in option.opts):
            continue  # the subcommand has an option of that name of its own
        options.append(
            click.Option(
                [*option.opts, option.name],
                type=option.type,
                multiple=option.multiple,
                metavar=option.metavar,
                default=None,
                show_default=False,
                expose_value=False,
                callback=_after_subcommand,
                help=_AFTER_HELP[option.name],
            )
        )
    return options


def _accept_shared_options_after(group: click.Group) -> None:
    """Every subcommand (and sub-subcommand) takes the shared options too, as most daemons do."""
    for command in group.commands.values():
        command.params.extend(_shared_options(command))
        if isinstance(command, click.Group):
            _accept_shared_options_after(command)


_register()
_accept_shared_options_after(cli)


def main() -> None:
    cli(prog_name="streamvi")


if __name__ == "__main__":
    main()
