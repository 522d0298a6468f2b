"""Resident memory of the daemon over a long stream: is it flat between ``--early`` and ``--total`` records?

Target: RSS at 1M records within 10% of RSS at 100k records (the defaults).

Starts the embedded broker and runs ``streamvi run`` as a real subprocess (as the fault kit does:
settings passed as STREAMVI_* variables), so the RSS measured is the daemon's own. A feeder thread
produces MNIST-sized records (bench/throughput.py's payload, in ``input.format``) in chunks, staying
up to ``ahead`` records ahead of what the daemon has consumed, so it is kept busy without the whole
stream being produced first. About every ``interval`` seconds the daemon's VmRSS is read from
/proc/<pid>/status together with its progress, ``streamvi_records_consumed_total`` from its
/metrics endpoint (the committed offsets only move at checkpoints, too coarse for this). The RSS
at a mark is the first sample at or past it; the records consumed at that sample are reported too.

Prints one JSON object: RSS (MiB) at ``early`` and at ``total`` records, the peak, ``growth_ratio``
= rss_at_total / rss_at_early, ``within_10_percent``, and a coarse RSS-vs-records series.

Usage: python bench/memory.py [--total 1000000] [--early 100000] [--format f32|json] [--config FILE]
                              [--set SECTION.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from streamvi.config import Settings, load_settings
from streamvi.io.admin import ensure_topics
from streamvi.io.embedded import EmbeddedBroker
from streamvi.runtime import versions

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, payload, produce

from tests.integration.faultkit import DaemonProcess

CONSUMED = "streamvi_records_consumed_total"


def proc_status_mib(pid: int, field: str = "VmRSS") -> float | None:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM...) in MiB; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # the kernel reports kB
    except OSError:
        return None
    return None


class Feeder:
    """Produces the input stream on a thread in chunks, at most ``ahead`` records past ``consumed``."""

    def __init__(self, settings: Settings, total: int, chunk: int, ahead: int) -> None:
        self.settings = settings
        self.total = total
        self.chunk = chunk
        self.ahead = ahead
        self.x = payload(1000, settings.input.dim)
        self.produced = 0
        self.consumed = 0  # updated by the sampler
        self.record_bytes = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-feeder", daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while self.produced < self.total and not self._stop.is_set():
                if self.produced - self.consumed >= self.ahead:
                    self._stop.wait(0.05)
                    continue
                count = min(self.chunk, self.total - self.produced)
                self.record_bytes = produce(self.settings, self.x, count, self.settings.input.format)
                self.produced += count
        except BaseException as exc:  # reported by the sampler, which owns the run
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def at_mark(samples: list[tuple[float, int, float]], mark: int) -> tuple[float, int, float] | None:
    """The first (seconds, records consumed, RSS MiB) sample at or past ``mark`` records."""
    return next((s for s in samples if s[1] >= mark), None)


def measure_memory(
    settings: Settings,
    total: int = 1_000_000,
    early: int = 100_000,
    *,
    workdir: Path | None = None,
    interval: float = 0.5,
    points: int = 10,
    chunk: int = 10_000,
    ahead: int = 50_000,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Stream ``total`` records through a ``streamvi run`` subprocess and sample its RSS on the way.

    The topics must exist and the settings must enable /metrics (progress is read there); the
    daemon's log goes to ``workdir`` (default: a temporary directory, removed after). The daemon is
    stopped with SIGTERM at the end, killed if it does not exit in time. ``timeout`` (default:
    600 s + 10 ms per record) bounds the whole run.
    """
    if not settings.metrics.enabled:
        raise ValueError("measure_memory reads progress from /metrics: metrics.enabled must be true")
    if not 0 < early < total:
        raise ValueError(f"need 0 < early < total (got early={early}, total={total})")
    timeout = timeout if timeout is not None else 600.0 + total / 100.0
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="streamvi-memory-") as tmp:
            return measure_memory(
                settings,
                total,
                early,
                workdir=Path(tmp),
                interval=interval,
                points=points,
                chunk=chunk,
                ahead=ahead,
                timeout=timeout,
            )
    feeder = Feeder(settings, total, chunk, ahead).start()
    started = time.monotonic()
    try:
        daemon = DaemonProcess(settings, workdir / "daemon.log")
    except BaseException:
        feeder.stop()
        raise
    pid = daemon.process.pid
    samples: list[tuple[float, int, float]] = []  # (seconds since start, records consumed, RSS MiB)
    backlog_while_busy: list[int] = []
    try:
        daemon.wait_for_metrics(timeout=timeout)
        consumed = 0
        while consumed < total:
            tick = time.monotonic()
            if feeder.error is not None:
                raise RuntimeError(f"the feeder failed: {feeder.error!r}") from feeder.error
            code = daemon.process.poll()
            if code is not None or tick - started > timeout:
                state = f"exited with {code}" if code is not None else f"timed out after {timeout}s"
                raise RuntimeError(f"daemon {state} at {consumed} records:\n{daemon.log_text()[-3000:]}")
            rss = proc_status_mib(pid)
            value = int(daemon.sample(CONSUMED))
            if rss is not None and value >= consumed:  # a failed scrape reads 0: skip it
                consumed = value
                feeder.consumed = consumed
                samples.append((tick - started, consumed, rss))
                if consumed > 0 and feeder.produced < total:  # the end of the stream drains by design
                    backlog_while_busy.append(feeder.produced - consumed)
            time.sleep(max(0.0, interval - (time.monotonic() - tick)))
        hwm = proc_status_mib(pid, "VmHWM")
    finally:
        feeder.stop()
        if daemon.process.poll() is None:
            daemon.signal(signal.SIGTERM)
        exit_code = daemon.wait(timeout=settings.processing.shutdown_grace_seconds + 30)

    first_busy = next(s for s in samples if s[1] > 0)
    at_early, at_total = at_mark(samples, early), at_mark(samples, total)
    assert at_early is not None and at_total is not None
    busy = [s for s in samples if s[1] > 0]
    peak = max(busy, key=lambda s: s[2])
    series = []
    for k in range(1, points + 1):
        sample = at_mark(samples, total * k // points)
        if sample is not None:
            series.append({"records": sample[1], "rss_mib": round(sample[2], 1)})
    ratio = at_total[2] / at_early[2]
    return {
        "benchmark": "memory",
        "total": total,
        "early": early,
        "format": settings.input.format,
        "record_bytes": feeder.record_bytes,
        "rss_mib_at_early": round(at_early[2], 1),
        "records_at_early_sample": at_early[1],
        "rss_mib_at_total": round(at_total[2], 1),
        "records_at_total_sample": at_total[1],
        "growth_ratio": round(ratio, 4),
        "within_10_percent": bool(abs(ratio - 1.0) <= 0.10),
        "peak_rss_mib_sampled": round(peak[2], 1),
        "records_at_peak": peak[1],
        "vm_hwm_mib": round(hwm, 1) if hwm is not None else None,  # the kernel's peak, startup included
        "rss_mib_at_first_records": round(first_busy[2], 1),
        "series": series,
        "samples": len(samples),
        "seconds": round(samples[-1][0], 1),
        "records_per_s": round((at_total[1] - first_busy[1]) / (at_total[0] - first_busy[0]), 1)
        if at_total[0] > first_busy[0]
        else None,
        # the feeder's lead while both worked (records in flushed chunks minus records consumed, lowest
        # sample before the feeder finished): at or below 0 the daemon had caught up and may have waited
        "min_backlog_records": min(backlog_while_busy) if backlog_while_busy else None,
        "daemon_exit_code": exit_code,
        "batch_size": settings.training.batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--total", type=int, default=1_000_000, help="records to stream")
    parser.add_argument("--early", type=int, default=100_000, help="the early mark RSS is compared with")
    parser.add_argument("--format", choices=["json", "f32"], default="f32")
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--config", default=str(ROOT / "bench" / "bench.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="streamvi-memory-") as tmp,
        EmbeddedBroker(log_file=Path(tmp) / "broker.log") as broker,
    ):
        settings = load_settings(
            args.config,
            [
                f"kafka.bootstrap_servers={broker.bootstrap_servers}",
                f"input.format={args.format}",
                f"input.dim={args.dim}",
                f"snapshots.dir={Path(tmp) / 'snapshots'}",
                *args.set,
            ],
        )
        ensure_topics(settings.kafka)
        result = measure_memory(settings, args.total, args.early, workdir=Path(tmp), interval=args.interval)
        # The embedded broker keeps every record in memory: its size is context, not the target.
        result["broker_rss_mib_at_end"] = round(proc_status_mib(broker.pid) or 0.0, 1)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), **versions()}
    print(json.dumps(result, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
