"""Start-up of ``streamvi run``: from launching the command to the first trained batch it reports.

A real ``streamvi run`` subprocess (settings as STREAMVI_* variables, as a container passes them)
starts against the embedded broker with records already waiting on the input topic. Its /metrics
endpoint is polled every 20 ms, and the run is split into:

- ``to_metrics_served_seconds``: interpreter, imports (TensorFlow's is most of it), config, model
  and optimizer built, Kafka clients connected, /metrics serving;
- ``to_first_trained_batch_seconds``: until ``streamvi_train_steps_total`` reaches 1, i.e. the
  first step has run and been reported (group join, first fetch and the first step included);
- ``compile_seconds``: tracing and XLA-compiling the step (``streamvi_step_compile_seconds``); the
  daemon does it on its step thread while the consumer joins the group, so it overlaps the join;
- ``first_step_seconds`` and ``steady_step_seconds`` (mean of the next ``steps_after``): the first
  step costs no more than the others once the compile is done ahead of it.

Usage: python bench/startup.py [--format json|f32] [--config FILE] [--set SECTION.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from streamvi.config import Settings, load_settings
from streamvi.io.admin import ensure_topics
from streamvi.io.embedded import EmbeddedBroker

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, payload, produce

from tests.integration.faultkit import DaemonProcess


def _samples(url: str, *names: str) -> list[float]:
    """Unlabelled samples of a /metrics page, in the order asked; zeros while it is not up."""
    try:
        body = urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        return [0.0] * len(names)
    found = dict.fromkeys(names, 0.0)
    for line in body.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return [found[name] for name in names]


def _histogram(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of an unlabelled histogram."""
    total, count = _samples(url, f"{name}_sum", f"{name}_count")
    return total, count


def measure_startup(settings: Settings, workdir: Path, steps_after: int = 20) -> dict[str, Any]:
    """Launch ``streamvi run`` on input already waiting and time its start-up (see the module doc).

    The input topic must hold at least ``(steps_after + 1) * training.batch_size`` records.
    """
    name = "streamvi_step_duration_seconds"
    started = time.monotonic()
    daemon = DaemonProcess(settings, workdir / "startup-daemon.log")
    try:
        url = daemon.wait_for_metrics(timeout=300)
        served = time.monotonic()
        first_sum = 0.0
        deadline = served + 300
        while time.monotonic() < deadline:
            first_sum, count = _histogram(url, name)
            if count >= 1:
                break
            if daemon.process.poll() is not None:
                raise RuntimeError(f"streamvi run exited early:\n{daemon.log_text()[-3000:]}")
            time.sleep(0.02)
        first_batch = time.monotonic()
        # the steady step: mean of the steps after the first one
        later_sum, later_count = first_sum, 1.0
        while later_count < 1 + steps_after and time.monotonic() < deadline:
            time.sleep(0.1)
            later_sum, later_count = _histogram(url, name)
        (compile_seconds,) = _samples(url, "streamvi_step_compile_seconds")
    finally:
        daemon.signal(15)
        daemon.wait(timeout=60)
    steady = (later_sum - first_sum) / max(later_count - 1, 1)
    return {
        "to_metrics_served_seconds": round(served - started, 2),
        "to_first_trained_batch_seconds": round(first_batch - started, 2),
        "compile_seconds": round(compile_seconds, 3),
        "first_step_seconds": round(first_sum, 4),
        "steady_step_seconds": round(steady, 4),
        "steps_averaged": int(later_count - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--format", choices=["json", "f32"], default="json")
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--config", default=str(ROOT / "bench" / "bench.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="streamvi-bench-startup-"))
    with EmbeddedBroker(log_file=workdir / "broker.log") as broker:
        settings = load_settings(
            args.config,
            [
                f"kafka.bootstrap_servers={broker.bootstrap_servers}",
                f"input.format={args.format}",
                f"input.dim={args.dim}",
                f"snapshots.dir={workdir / 'snapshots'}",
                *args.set,
            ],
        )
        ensure_topics(settings.kafka)
        produce(settings, payload(1000, args.dim), 30 * settings.training.batch_size, args.format)
        print(json.dumps({"benchmark": "startup", **measure_startup(settings, workdir)}, indent=2))


if __name__ == "__main__":
    main()
