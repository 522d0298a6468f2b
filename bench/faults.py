"""Randomized kill run: SIGKILL the daemon many times while it works through a stream, then count.

Starts the embedded broker, produces ``--records`` sequenced records (fed in slices, so kills also
land while input is still arriving), runs ``streamvi run`` as a subprocess and SIGKILLs it
``--kills`` times, each at a random moment (seeded) after it has started training: mid-batch,
mid-snapshot, between snapshot and commit. A last instance finishes the stream. Then the latents
topic is read back (as a read_committed consumer for exactly_once) and checked.

Prints one JSON object per guarantee: {"guarantee", "kills", "records", "lost", "duplicates",
"max_duplicates_allowed", "snapshot_records_trained", "committed_offset", ...}. Exit status 1 if
anything was lost, exactly_once produced a duplicate, at_least_once exceeded its bound, or the
snapshot's trained-record count differs from the committed offsets.

Usage: python bench/faults.py [--kills 50] [--records 100000] [--guarantee both|exactly_once|at_least_once]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamvi.config import load_settings  # noqa: E402
from streamvi.io.admin import ensure_topics  # noqa: E402
from streamvi.io.embedded import EmbeddedBroker  # noqa: E402
from tests.integration.faultkit import fault_overrides, run_kill_scenario  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--guarantee", choices=["both", "exactly_once", "at_least_once"], default="both")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-kill-delay", type=float, default=3.0, help="seconds after training starts")
    parser.add_argument("--feed-batches", type=int, default=10, help="input produced in this many slices")
    args = parser.parse_args()

    guarantees = ["exactly_once", "at_least_once"] if args.guarantee == "both" else [args.guarantee]
    failed = False
    with (
        tempfile.TemporaryDirectory(prefix="streamvi-faults-") as tmp,
        EmbeddedBroker(log_file=Path(tmp) / "broker.log") as broker,
    ):
        for index, guarantee in enumerate(guarantees):
            workdir = Path(tmp) / guarantee
            workdir.mkdir()
            settings = load_settings(
                overrides=[
                    f"kafka.bootstrap_servers={broker.bootstrap_servers}",
                    f"kafka.input_topic=faults-in-{index}",
                    f"kafka.latents_topic=faults-latents-{index}",
                    f"kafka.metrics_topic=faults-metrics-{index}",
                    f"kafka.dead_letter_topic=faults-dlq-{index}",
                    f"kafka.group_id=faults-{index}",
                    f"snapshots.dir={workdir / 'snapshots'}",
                    "metrics.port=0",
                    # every record is trained, so the snapshot's trained count must equal the offsets
                    "evaluation.heldout_fraction=0",
                    *fault_overrides(guarantee),
                    # bigger steps than the test set, so the run covers many records per kill
                    "training.batch_size=64",
                    "kafka.max_poll_records=256",
                    "snapshots.every_steps=4",
                ],
                environ={},
            )
            ensure_topics(settings.kafka)
            started = time.monotonic()
            report = run_kill_scenario(
                settings,
                args.records,
                args.kills,
                args.seed + index,
                workdir,
                max_kill_delay=args.max_kill_delay,
                feed_batches=args.feed_batches,
            )
            result = report.as_json()
            result["seconds"] = round(time.monotonic() - started, 1)
            result["kill_after_records"] = report.kill_after_records
            ok = (
                report.lost == 0
                and report.corrupt_outputs == 0
                and report.duplicates <= report.max_duplicates_allowed
                and report.snapshot_records_trained == report.committed_offset == args.records
            )
            result["ok"] = ok
            failed |= not ok
            print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
