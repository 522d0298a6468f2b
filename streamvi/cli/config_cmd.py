"""``streamvi config show|validate``."""

from __future__ import annotations

from collections import Counter

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
    """Check the configuration (a feature schema, and the trainer cluster it names with TF_CONFIG);
    exit 2 with a message naming each bad setting."""
    try:
        settings = cli_ctx.settings()
        resolve_cluster(settings.distribution)
    except StreamVIError as exc:
        fail(exc)
    features = settings.input.features
    if features is None:
        click.echo("configuration is valid")
        return
    kinds = Counter(feature.type for feature in features)
    summary = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    click.echo(f"configuration is valid; input.features: {len(features)} features ({summary})")
