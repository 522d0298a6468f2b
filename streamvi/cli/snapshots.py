"""``streamvi snapshots list|show|export``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from streamvi.cli.common import CliContext, fail, pass_cli
from streamvi.errors import StreamVIError


@click.group("snapshots")
def snapshots_group() -> None:
    """Inspect snapshots."""


def _directory(cli_ctx: CliContext, directory: str | None) -> Path:
    return Path(directory) if directory else cli_ctx.settings().snapshots.dir


@snapshots_group.command("list")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="[default: snapshots.dir]")
@pass_cli
def list_snapshots(cli_ctx: CliContext, directory: str | None) -> None:
    """List snapshots, newest first, with step, records trained, offsets and validity."""
    from streamvi.snapshots.store import SnapshotStore, read_tags

    try:
        store = SnapshotStore(_directory(cli_ctx, directory))
        entries = store.list()
    except StreamVIError as exc:
        fail(exc)
    if not entries:
        click.echo(f"no snapshots in {store.directory}")
        return
    for path, info, problem in entries:
        if info is None:
            click.echo(f"{path.name}  CORRUPT  {problem}")
            continue
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.meta.get("created_at", 0)))
        trained = info.meta.get("counts", {}).get("records_trained", "?")
        offsets = json.dumps(info.meta.get("offsets", {}), sort_keys=True)
        tags = ",".join(tag.get("tag", "?") for tag in read_tags(path))
        shown = f"  tags={tags}" if tags else ""
        click.echo(
            f"{path.name}  step={info.step}  trained={trained}  created={created}  offsets={offsets}{shown}"
        )


@snapshots_group.command("show")
@click.argument("snapshot", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--full", is_flag=True, help="Print the per-step history too, not only its extent.")
@pass_cli
def show(cli_ctx: CliContext, snapshot: str | None, full: bool) -> None:
    """Print one snapshot's meta.json (default: the newest valid one in snapshots.dir)."""
    from streamvi.snapshots.loading import find_snapshot

    try:
        info = find_snapshot(snapshot or _directory(cli_ctx, None))
    except StreamVIError as exc:
        fail(exc)
    meta = dict(info.meta, path=str(info.path))
    history = meta.get("history")
    if isinstance(history, dict) and not full:
        steps = history.get("step", [])
        meta["history"] = {
            "points": len(steps),
            "stride": history.get("stride"),
            "steps": [steps[0], steps[-1]] if steps else [],
            "hint": "streamvi report plots it; --full prints it",
        }
    click.echo(json.dumps(meta, indent=2, sort_keys=True))


@snapshots_group.command("export")
@click.argument("snapshot", required=False, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--saved-model",
    "saved_model",
    required=True,
    type=click.Path(),
    help="Directory to write the SavedModel to; for TF Serving use <model_base_path>/<version>.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing export in that directory.")
@pass_cli
def export(cli_ctx: CliContext, snapshot: str | None, saved_model: str, overwrite: bool) -> None:
    """Export the encoder as a SavedModel whose serving_default maps x (and c) to z_mean and z_scale
    (default snapshot: the newest valid one in snapshots.dir)."""
    from streamvi.serving import export_saved_model
    from streamvi.snapshots.loading import find_snapshot

    try:
        info = find_snapshot(snapshot or _directory(cli_ctx, None))
        target = export_saved_model(info, saved_model, overwrite=overwrite)
    except StreamVIError as exc:
        fail(exc)
    click.echo(f"exported {info.path.name} (step {info.step}) to {target}")
