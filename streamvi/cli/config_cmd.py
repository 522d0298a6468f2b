"""``streamvi config show|validate``."""

from __future__ import annotations

import click
import yaml

from streamvi.cli.common import CliContext, fail, pass_cli
from streamvi.cluster import resolve_cluster
from streamvi.errors import StreamVIError


@click.group("config")
def config_group() -> None:
    """Inspect the effective configuration."""


@config_group.command("show")
@pass_cli
def show(cli_ctx: CliContext) -> None:
    """Print the effective configuration as YAML, secrets masked."""
    try:
        settings = cli_ctx.settings()
    except StreamVIError as exc:
        fail(exc)
    click.echo(yaml.safe_dump(settings.public_dict(), sort_keys=False), nl=False)


@config_group.command("validate")
@pass_cli
def validate(cli_ctx: CliContext) -> None:
    """Check the configuration (and the trainer cluster it names, TF_CONFIG included); exit 2
    with a message naming each bad setting."""
    try:
        resolve_cluster(cli_ctx.settings().distribution)
    except StreamVIError as exc:
        fail(exc)
    click.echo("configuration is valid")
