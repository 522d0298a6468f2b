"""What the likelihood, the model's size and rehearsal do to one-pass detection on bench/anomaly.py's
streams: the settings behind its digits run, and why the named-field streams keep the small model.

Each run is the daemon's loop over one stream (bench/anomaly.py's ``run_daemon``, prequential, one
pass, seed 0), under bench/anomaly.py's COMMON settings plus the run's own. For each: ROC AUC and
average precision of -elbo over the whole stream and over its first ``--lof-prefix`` records (where
ILOF is compared), the held-out records' mean prequential ELBO (no label involved) and seconds.

- ``digits``: the 9s among classes 0-8, as bench/anomaly.py builds it. The likelihood of the counts
  (binomial of 16 trials, continuous Bernoulli and a Gaussian of scale 0.1 on the counts / 16, these
  two as densities of other units, so their ELBOs are not comparable with the binomial's), the
  model (COMMON's, latent 4 and 64 hidden units, batch 64; the daemon's default size, latent 8 and
  [256, 128], batch 16) and ``training.rehearsal_steps`` (window 2,048).
- ``shuttle``: River's Shuttle under bench/anomaly.py's schema, with the digits' model and
  rehearsal: where faster learning also learns the anomalies (7.2% of the stream).

Usage: python bench/rehearsal.py [--streams digits,shuttle] [--lof-prefix 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anomaly import (
    DIGITS,
    DIGITS_DATA,
    digits_stream,
    heldout_elbo,
    ranking,
    run_daemon,
    schema_overrides,
    shuttle,
    streamvi_scores,
)

from streamvi.datasets import encode_record

#: The daemon's default model size at batch 16, without rehearsal.
DEFAULT_MODEL = ["model.latent_dim=8", "model.encoder_hidden=[256,128]", "training.batch_size=16"]
WINDOW = "training.rehearsal_window_records=2048"


def rehearsing(steps: int) -> list[str]:
    return [WINDOW, f"training.rehearsal_steps={steps}"]


def digits_runs() -> dict[str, tuple[str, list[str]]]:
    """Name -> (the values' units, overrides)."""
    unit = ["input.dim=64"]
    return {
        "binomial, common model": ("counts", DIGITS_DATA),
        "binomial, default model, batch 16": ("counts", [*DIGITS_DATA, *DEFAULT_MODEL]),
        **{
            f"binomial, default model, batch 16, rehearsal {k}": (
                "counts",
                [*DIGITS_DATA, *DEFAULT_MODEL, *rehearsing(k)],
            )
            for k in (4, 16)
        },
        "binomial, default model, batch 16, rehearsal 64 (bench/anomaly.py)": ("counts", DIGITS),
        "continuous Bernoulli, default model, batch 16, rehearsal 64": (
            "unit",
            ["model.likelihood=continuous_bernoulli", *unit, *DEFAULT_MODEL, *rehearsing(64)],
        ),
        "gaussian 0.1, default model, batch 16, rehearsal 64": (
            "unit",
            ["model.likelihood=gaussian", *unit, *DEFAULT_MODEL, *rehearsing(64)],
        ),
    }


def measured(labels: np.ndarray, values: list[bytes], overrides: list[str], prefix: int) -> dict[str, Any]:
    started = time.time()
    run = run_daemon(values, overrides)
    score = streamvi_scores(run)["streamvi"]
    return {
        "whole": ranking(labels, score),
        "prefix": ranking(labels[:prefix], score[:prefix]),
        "heldout_prequential_elbo": heldout_elbo(run)["mean"],
        "seconds": round(time.time() - started, 1),
    }


def digits(prefix: int) -> dict[str, Any]:
    x, labels = digits_stream(10_000, np.random.default_rng(0))
    values = {
        "counts": [encode_record(x[i], f"r{i}", "json") for i in range(len(x))],
        "unit": [encode_record(x[i] / 16.0, f"r{i}", "json") for i in range(len(x))],
    }
    out = {}
    for name, (unit, overrides) in digits_runs().items():
        out[name] = measured(labels, values[unit], overrides, prefix)
        print(f"[digits: {name}] {json.dumps(out[name])}", file=sys.stderr, flush=True)
    return out


def shuttle_runs(prefix: int) -> dict[str, Any]:
    rows, labels = shuttle()
    values = [orjson.dumps(r) for r in rows]
    schema = schema_overrides(list(rows[0]))
    runs = {
        "common model (bench/anomaly.py)": schema,
        **{
            f"default model, batch 16, rehearsal {k}": [*schema, *DEFAULT_MODEL, *rehearsing(k)]
            for k in (8, 64)
        },
    }
    out = {}
    for name, overrides in runs.items():
        out[name] = measured(labels, values, overrides, prefix)
        print(f"[shuttle: {name}] {json.dumps(out[name])}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", default="digits,shuttle")
    parser.add_argument("--lof-prefix", type=int, default=3_000)
    args = parser.parse_args()
    streams = args.streams.split(",")
    result: dict[str, Any] = {"benchmark": "rehearsal", "lof_prefix": args.lof_prefix}
    if "digits" in streams:
        result["digits"] = digits(args.lof_prefix)
    if "shuttle" in streams:
        result["shuttle"] = shuttle_runs(args.lof_prefix)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
