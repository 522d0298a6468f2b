"""Shared CLI plumbing: settings from --config/--set/env, logging, error reporting, signal handling."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import click

from streamvi.config import Settings, load_settings
from streamvi.errors import StreamVIError


@dataclass
class CliContext:
    """What the shared options said, before the subcommand and after it (the later one wins)."""

    config_path: str | None
    overrides: list[str] = field(default_factory=list)

    def settings(self, extra: list[str] | None = None) -> Settings:
        return load_settings(self.config_path, [*self.overrides, *(extra or [])])


pass_cli = click.make_pass_decorator(CliContext)


def fail(error: StreamVIError) -> None:
    """Print a StreamVIError as a one-paragraph message and exit with status 2."""
    click.echo(f"streamvi: error: {error}", err=True)
    raise SystemExit(2)


def stop_on_signals(grace_seconds: float | None = None) -> threading.Event:
    """An event set by SIGTERM or SIGINT, so the daemon finishes its checkpoint and exits cleanly.

    With ``grace_seconds``, a process still running that long after the first signal exits at once
    with status 3 (the last snapshot and committed offsets stay consistent; the rest is replayed).
    """
    stop = threading.Event()

    def expire() -> None:
        logging.getLogger("streamvi").error(
            "shutdown did not finish within processing.shutdown_grace_seconds=%s; exiting now", grace_seconds
        )
        logging.shutdown()
        os._exit(3)

    def handler(signum: int, frame: Any) -> None:
        logging.getLogger("streamvi").info(
            "received %s; stopping after a final checkpoint", signal.Signals(signum).name
        )
        if grace_seconds is not None and not stop.is_set():
            timer = threading.Timer(grace_seconds, expire)
            timer.daemon = True
            timer.start()
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
