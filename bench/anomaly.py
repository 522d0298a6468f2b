"""Anomaly detection and drift handling of the daemon's per-record ELBO, against River's detectors.

The daemon's real loop (``OnlineLoop``) runs in-process on the in-memory source and sink, with one
set of model settings for the named-field streams and one for the digits (stated in the JSON's
``settings``). Everything is prequential and one pass: each record is scored before anything learns
from it.

Part 1, detection. Three labelled streams, each in one fixed (seeded) record order:

- ``shuttle``: River's bundled Shuttle set (49,097 records, 9 integer features, label 1 = anomaly,
  7.2%), in the file's order, fed to the daemon as named-field JSON events under a feature schema
  (9 numeric features, online normalisation; every numeric feature a Student-t in both named-field
  streams, the Gaussian run as well in ``streamvi_with`` with its held-out prequential ELBO).
- ``digits``: scikit-learn's digits (64 counts 0-16, plain vectors, binomial of 16 trials):
  the classes 0-8 resampled with replacement to ``--digits-normal`` records, with distinct 9s
  (~1.5% of the stream) inserted at random positions.
- ``breast_cancer``: scikit-learn's breast-cancer set as named-field events (30 numeric features,
  online normalisation): the 357 benign records shuffled anew ``--cancer-passes`` times, each pass
  with 25 distinct malignant records (6.5%) inserted at random positions.

For each stream: ROC AUC and average precision (scikit-learn) of the daemon's score (-elbo from the
latents topic; the first batch, scored at model step 0 before the daemon had seen any record, ranks
lowest, as HalfSpaceTrees' first window scores 0; ``streamvi_scores`` lists the other ways it is
also ranked) and of River's HalfSpaceTrees (behind a MinMaxScaler), OneClassSVM (behind a
StandardScaler) and LocalOutlierFactor (ILOF), each scoring a record with ``score_one`` before
``learn_one``. ILOF's cost grows with the records it holds, so it runs on a prefix of each stream
(``--lof-prefix``); every detector is scored on that prefix as well (``on_lof_prefix``). For the
daemon: the flag's precision, recall and flagged fraction, the share of records with a null
percentile, drifts detected; and the margin of the daemon over the best River detector.

Part 2, drift. Digits 0-4 resampled with replacement to ``--drift-before`` records, then 5-9 to
``--drift-after`` (counts 0-16, the digits' settings), the switch at a known position. For ADWIN
with each drift response (none, reset_optimizer, raise_learning_rate), Page-Hinkley with none, and
no detector: detection delay (records from the switch to the end of the batch whose step reported
the first drift after it, positions from the step messages' ``records`` summed), false alarms
before the switch (per 10k pre-switch records, and the records the detector watched there after
its warm-up), and recovery: the records after the switch until the rolling mean (500 records) of the latents'
prequential ELBO, over a window wholly after the switch, is at least its value over the 500 records
before the switch minus 1 nat (null if never: the new classes may be harder to model), and the mean
prequential ELBO over the 5,000 records after the switch (how soon the model caught up).

Usage: python bench/anomaly.py [--quick] [--seed 0] [--parts detection,drift]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import orjson
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.metrics import average_precision_score, roc_auc_score

from streamvi.config import load_settings
from streamvi.datasets import encode_record
from streamvi.io.base import RawRecord
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.metrics import Health, Metrics
from streamvi.runtime import anomaly_monitor, build_decoder, build_trainer, evaluation_policy
from streamvi.snapshots import SnapshotStore
from streamvi.stream import CheckpointPolicy, OnlineLoop, OutputTopics

#: The model and stream settings shared by every run (a user's plausible first choice).
COMMON = [
    "model.latent_dim=4",
    "model.encoder_hidden=[64]",
    "training.batch_size=64",
    "training.learning_rate=0.001",
    "training.optimizer=adam",
    "training.estimator=sgvb_b",
    "training.seed=0",
    "evaluation.heldout_fraction=0.1",
    "anomaly.min_reference_records=100",
]
#: The digits as they are made: each value the count (0-16) of set pixels in a 4x4 block of a
#: 32x32 bitmap, a binomial decoder of 16 trials per value.
DIGITS_DATA = ["model.likelihood=binomial", "model.binomial_total_count=16", "input.dim=64"]
#: The digits' model: the daemon's default size, batches of 16, and rehearsal (64 further updates
#: per step on the last 2,048 trained records). COMMON's model does not learn these images within
#: one pass of 10,000 records; the run repeats it (``streamvi_with``).
DIGITS = [
    *DIGITS_DATA,
    "model.latent_dim=8",
    "model.encoder_hidden=[256,128]",
    "training.batch_size=16",
    "training.rehearsal_window_records=2048",
    "training.rehearsal_steps=64",
]
ROLLING = 500
#: The records after a switch over which the drift part averages the prequential ELBO.
ADAPT = 5_000


# -- the daemon -----------------------------------------------------------------------------------
def run_daemon(values: list[bytes], overrides: list[str]) -> dict[str, Any]:
    """``values`` through the daemon's loop (keys ``k<position>``); latents and metrics messages."""
    settings = load_settings(overrides=[*COMMON, *overrides], environ={})
    records = [RawRecord("in", 0, i, f"k{i}".encode(), v) for i, v in enumerate(values)]
    trainer = build_trainer(settings)
    policy = evaluation_policy(settings)
    with tempfile.TemporaryDirectory(prefix="streamvi-anomaly-") as workdir:
        loop = OnlineLoop(
            source=MemorySource(records),
            sink=(sink := MemorySink()),
            decoder=build_decoder(settings),
            trainer=trainer,
            store=SnapshotStore(workdir),
            topics=OutputTopics("lat", "met", "dlq", "anom"),
            policy=CheckpointPolicy(500, 3600),
            max_batch_latency_seconds=5,
            metrics=Metrics(CollectorRegistry()),
            health=Health(),
            max_poll_records=500,
            evaluation=policy,
            anomaly=anomaly_monitor(settings),
            pipeline_depth=settings.training.pipeline_depth,
        )
        loop.restore()
        counts = loop.run(max_records=len(records))
    latents = sorted((orjson.loads(m.value) for m in sink.on_topic("lat")), key=lambda m: m["offset"])
    metrics = [orjson.loads(m.value) for m in sink.on_topic("met")]
    assert [m["offset"] for m in latents] == list(range(len(records))), "one latent per record"
    held = (
        np.array([policy.reservoir.selects(r) for r in records]) if policy else np.zeros(len(records), bool)
    )
    return {
        "elbo": np.array([np.nan if m["elbo"] is None else m["elbo"] for m in latents], dtype=np.float64),
        "flag": np.array([bool(m["anomaly"]) for m in latents]),
        "percentile": np.array(
            [np.nan if m["anomaly_percentile"] is None else m["anomaly_percentile"] for m in latents]
        ),
        "percentile_null": np.array([m["anomaly_percentile"] is None for m in latents]),
        "ready": scored_ready(metrics, len(records)),
        "model_step": np.array([m["model_step"] for m in latents]),
        "metrics": metrics,
        "heldout": held,
        "counts": counts,
        "settings": settings,
    }


def scored_ready(metrics: list[dict[str, Any]], records: int) -> np.ndarray:
    """Per record, whether the model that scored it was ready (the step message's ``model_ready``,
    over its batch's ``records``); a batch with no step message (nothing trainable) counts as ready."""
    ready = np.ones(records, dtype=bool)
    position = 0
    for m in sorted((m for m in metrics if m.get("kind") == "step"), key=lambda m: m["step"]):
        ready[position : position + m["records"]] = m["model_ready"]
        position += m["records"]
    return ready


def streamvi_scores(run: dict[str, Any]) -> dict[str, np.ndarray]:
    """The daemon's scores four ways (higher: more anomalous).

    - ``streamvi``: -elbo, except that a record scored by the model at step 0, before the daemon had
      seen any record of the stream (the first batch), has no opinion and ranks lowest, as River's
      HalfSpaceTrees scores 0 until it has seen its first window (``score_one`` returns 0 there).
    - ``streamvi_warm_up_no_opinion``: likewise for every record scored before the model was ready
      (the normaliser's warm-up, a few batches; the same as ``streamvi`` without a normaliser).
    - ``streamvi_every_elbo``: -elbo of every record.
    - ``streamvi_percentile``: the calibrated percentile, ties (100: below every reference score)
      broken by -elbo, a null percentile ranking lowest.
    """
    elbo = run["elbo"]
    neg = -np.where(np.isfinite(elbo), elbo, -np.inf)  # a missing bound: most anomalous
    ready = np.where(run["ready"], neg, -np.inf)
    seen = np.where(run["model_step"] > 0, neg, -np.inf)
    finite = neg[np.isfinite(neg)]
    spread = float(finite.max() - finite.min()) + 1.0 if finite.size else 1.0
    # the percentile first, then -elbo squeezed into (0, 1) of a percentile point: a lexicographic order
    tie = (np.clip(neg, finite.min(), finite.max()) - finite.min()) / spread if finite.size else 0
    percentile = np.where(np.isnan(run["percentile"]), -np.inf, run["percentile"] + 0.999 * tie)
    return {
        "streamvi": seen,
        "streamvi_warm_up_no_opinion": ready,
        "streamvi_every_elbo": neg,
        "streamvi_percentile": percentile,
    }


def heldout_elbo(run: dict[str, Any]) -> dict[str, float]:
    """The held-out records' prequential ELBO (no label involved: what chooses between models):
    mean over all, mean over the second half of the stream, median, and the 1st percentile."""
    elbo, held = run["elbo"], run["heldout"] & np.isfinite(run["elbo"])
    late = held & (np.arange(len(elbo)) >= len(elbo) // 2)
    return {
        "mean": round(float(elbo[held].mean()), 2),
        "mean_second_half": round(float(elbo[late].mean()), 2),
        "median": round(float(np.median(elbo[held])), 2),
        "p1": round(float(np.quantile(elbo[held], 0.01)), 1),
    }


def drift_positions(metrics: list[dict[str, Any]]) -> list[int]:
    """Each drift message's record position: the records of every step up to the one reporting it
    (a step message's ``records`` is its batch's)."""
    steps = sorted((m["step"], m["records"]) for m in metrics if m.get("kind") == "step")
    records_at = dict(zip([s for s, _ in steps], np.cumsum([r for _, r in steps]).tolist(), strict=True))
    return [records_at[m["step"]] for m in metrics if m.get("kind") == "drift"]


# -- River's detectors ----------------------------------------------------------------------------
def river_scores(rows: list[dict[Any, float]], which: list[str], seed: int) -> dict[str, np.ndarray]:
    """Prequential scores (score_one, then learn_one) of River's detectors on ``rows`` in order."""
    from river import anomaly, compose, preprocessing

    builders = {
        "half_space_trees": lambda: compose.Pipeline(
            preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(seed=seed)
        ),
        "one_class_svm": lambda: compose.Pipeline(
            preprocessing.StandardScaler(), anomaly.OneClassSVM(nu=0.2)
        ),
        "local_outlier_factor": lambda: anomaly.LocalOutlierFactor(n_neighbors=10),
    }
    out = {}
    for name in which:
        model = builders[name]()
        scores = np.empty(len(rows))
        for i, x in enumerate(rows):
            scores[i] = model.score_one(x)
            model.learn_one(x)
        out[name] = scores
    return out


def ranking(labels: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    """ROC AUC and average precision; non-finite scores (ILOF on duplicates) rank as the largest
    finite score (+inf) or the smallest (nan), and are counted."""
    score = np.asarray(score, dtype=np.float64).copy()
    bad = ~np.isfinite(score)
    if bad.any():
        finite = score[~bad]
        hi, lo = (finite.max() + 1, finite.min() - 1) if finite.size else (1.0, -1.0)
        score[np.isposinf(score)] = hi
        score[np.isnan(score) | np.isneginf(score)] = lo
    return {
        "roc_auc": round(float(roc_auc_score(labels, score)), 4),
        "average_precision": round(float(average_precision_score(labels, score)), 4),
        **({"non_finite_scores": int(bad.sum())} if bad.any() else {}),
    }


def compare(labels: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, Any]:
    figures = {name: ranking(labels, s) for name, s in scores.items()}
    river = {k: v for k, v in figures.items() if not k.startswith("streamvi")}
    out: dict[str, Any] = {"records": len(labels), "anomalies": int(labels.sum()), **figures}
    for metric in ("roc_auc", "average_precision"):
        best = max(river, key=lambda k: river[k][metric])
        margin = figures["streamvi"][metric] - river[best][metric]
        out[f"margin_{metric}"] = {"best_river": best, "streamvi_minus_best": round(margin, 4)}
    out["streamvi_ahead_of_every_river_detector"] = {
        metric: all(figures["streamvi"][metric] > v[metric] for v in river.values())
        for metric in ("roc_auc", "average_precision")
    }
    return out


def detection(
    name: str,
    values: list[bytes],
    rows: list[dict[Any, float]],
    labels: np.ndarray,
    overrides: list[str],
    lof_prefix: int,
    seed: int,
    alternative: list[str] | None = None,
) -> dict[str, Any]:
    started = time.time()
    run = run_daemon(values, overrides)
    daemon_seconds = time.time() - started
    flag = run["flag"]
    ours = streamvi_scores(run)
    started = time.time()
    river = river_scores(rows, ["half_space_trees", "one_class_svm"], seed)
    prefix = min(lof_prefix, len(rows))
    lof = river_scores(rows[:prefix], ["local_outlier_factor"], seed)
    river_seconds = time.time() - started
    tp = int((flag & (labels == 1)).sum())
    result = compare(labels, {**ours, **river})
    result["on_lof_prefix"] = compare(
        labels[:prefix],
        {**{k: v[:prefix] for k, v in ours.items()}, **{k: v[:prefix] for k, v in river.items()}, **lof},
    )
    result["streamvi_flag"] = {
        "threshold_percentile": run["settings"].anomaly.threshold_percentile,
        "flagged": int(flag.sum()),
        "flagged_fraction": round(float(flag.mean()), 4),
        "precision": round(tp / flag.sum(), 4) if flag.sum() else None,
        "recall": round(tp / labels.sum(), 4),
        "percentile_null_fraction": round(float(run["percentile_null"].mean()), 4),
        "scored_before_ready": int((~run["ready"]).sum()),
        "scored_at_step_0": int((run["model_step"] == 0).sum()),
        "first_calibrated_record": int(np.argmin(run["percentile_null"]))
        if not run["percentile_null"].all()
        else None,
        "drifts_detected": run["counts"].drifts_detected,
        "drift_positions": drift_positions(run["metrics"]),
        "heldout_records": int(run["heldout"].sum()),
        "records_trained": run["counts"].records_trained,
    }
    result["streamvi_heldout_prequential_elbo"] = heldout_elbo(run)
    if alternative is not None:
        # the same stream under other settings: its ranking and its label-free held-out ELBO
        other = run_daemon(values, alternative)
        score = streamvi_scores(other)["streamvi"]
        result["streamvi_with"] = {
            "overrides": alternative,
            **ranking(labels, score),
            "on_lof_prefix": ranking(labels[:prefix], score[:prefix]),
            "heldout_prequential_elbo": heldout_elbo(other),
        }
    result["seconds"] = {"streamvi": round(daemon_seconds, 1), "river": round(river_seconds, 1)}
    print(f"[{name}] {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


# -- the streams ----------------------------------------------------------------------------------
def shuttle() -> tuple[list[dict[str, float]], np.ndarray]:
    from river import datasets

    rows, labels = [], []
    for x, y in datasets.Shuttle():
        rows.append({k: float(v) for k, v in x.items()})
        labels.append(int(y))
    return rows, np.array(labels)


#: Named-field streams: each numeric feature's density a Student-t with learned degrees of freedom.
#: The Gaussian (the default) is run as well: its held-out prequential ELBO is far lower on both
#: streams (a value off a nearly constant feature costs it up to millions of nats).
NUMERIC = ["model.numeric_likelihood=student_t"]
GAUSSIAN_NUMERIC = ["model.numeric_likelihood=gaussian"]


def schema_overrides(names: list[str], numeric: list[str] = NUMERIC) -> list[str]:
    features = [{"name": n, "type": "numeric"} for n in names]
    return [f"input.features={json.dumps(features)}", *numeric]


def digits_stream(normal: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    x, y = data.data.astype(np.float32), data.target
    normals = rng.choice(np.flatnonzero(y != 9), normal, replace=True)
    nines = rng.choice(np.flatnonzero(y == 9), round(normal * 0.015), replace=False)
    order = np.concatenate([normals, nines])
    labels = np.concatenate([np.zeros(len(normals), int), np.ones(len(nines), int)])
    perm = rng.permutation(len(order))
    return x[order[perm]], labels[perm]


def cancer_stream(passes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    data = load_breast_cancer()
    names = [str(n).replace(" ", "_") for n in data.feature_names]
    benign, malignant = np.flatnonzero(data.target == 1), rng.permutation(np.flatnonzero(data.target == 0))
    per_pass = 25
    order, labels = [], []
    for p in range(passes):
        chosen = malignant[p * per_pass : (p + 1) * per_pass]
        # the benign in a fresh shuffle, the malignant records at random positions within the pass
        mask = np.zeros(len(benign) + len(chosen), bool)
        mask[rng.choice(len(mask), len(chosen), replace=False)] = True
        merged = np.empty(len(mask), int)
        merged[mask], merged[~mask] = chosen, rng.permutation(benign)
        lab = mask.astype(int)
        order.append(merged)
        labels.append(lab)
    idx = np.concatenate(order)
    return data.data[idx], np.concatenate(labels), names


# -- drift ----------------------------------------------------------------------------------------
def drift_stream(before: int, after: int, rng: np.random.Generator) -> np.ndarray:
    data = load_digits()
    x, y = data.data.astype(np.float32), data.target
    first = rng.choice(np.flatnonzero(y <= 4), before, replace=True)
    second = rng.choice(np.flatnonzero(y >= 5), after, replace=True)
    return x[np.concatenate([first, second])]


def recovery(elbo: np.ndarray, switch: int) -> dict[str, Any]:
    """How the rolling-mean ELBO comes back after the switch: its value just before the switch; the
    records after the switch until a wholly post-switch window's mean is back to that minus 1 nat
    (None: never; the new classes may be harder to model than the old); the mean prequential ELBO
    of the ``ADAPT`` records after the switch (higher: the model caught up sooner); and the
    post-switch rolling means every 1,000 records."""
    csum = np.concatenate([[0.0], np.cumsum(np.nan_to_num(elbo, nan=np.nanmin(elbo)))])
    before = (csum[switch] - csum[switch - ROLLING]) / ROLLING
    ends = np.arange(switch + ROLLING, len(elbo) + 1)  # window [end - ROLLING, end)
    means = (csum[ends] - csum[ends - ROLLING]) / ROLLING
    back = np.flatnonzero(means >= before - 1.0)
    adapt = min(ADAPT, len(elbo) - switch)
    return {
        "pre_switch_rolling_elbo": round(float(before), 3),
        "recovery_records": int(ends[back[0]] - switch) if back.size else None,
        f"mean_elbo_first_{ADAPT}_after_switch": round(
            float((csum[switch + adapt] - csum[switch]) / adapt), 2
        ),
        "post_switch_rolling_elbo_every_1000": [round(float(m), 2) for m in means[::1000]],
    }


def drift(before: int, after: int, seed: int) -> dict[str, Any]:
    x = drift_stream(before, after, np.random.default_rng(seed + 1))
    values = [encode_record(x[i], f"r{i}", "json") for i in range(len(x))]
    cases = [
        ("adwin", "none"),
        ("adwin", "reset_optimizer"),
        ("adwin", "raise_learning_rate"),
        ("page_hinkley", "none"),
        ("none", None),
    ]
    out: dict[str, Any] = {
        "stream": f"digits 0-4 resampled to {before}, then 5-9 resampled to {after}, counts 0-16",
        "switch_at_record": before,
        "rolling_window_records": ROLLING,
        "runs": {},
    }
    for detector, response in cases:
        overrides = [*DIGITS, f"anomaly.drift_detector={detector}"]
        if response is not None:
            overrides.append(f"anomaly.drift_response={response}")
        started = time.time()
        run = run_daemon(values, overrides)
        positions = drift_positions(run["metrics"])
        heldout = np.flatnonzero(run["heldout"])
        warmup = run["settings"].anomaly.drift_warmup_records
        watched_from = int(heldout[warmup]) if len(heldout) > warmup else None
        pre = [p for p in positions if p < before]
        post = [p for p in positions if p >= before]
        name = detector if response is None else f"{detector}+{response}"
        out["runs"][name] = {
            "drifts": len(positions),
            "drift_positions": positions,
            "detection_delay_records": post[0] - before if post else None,
            "false_alarms_before_switch": len(pre),
            "false_alarms_per_10k_pre_switch_records": round(len(pre) / before * 1e4, 2),
            "detector_watching_from_record": watched_from,
            **recovery(run["elbo"], before),
            "records_trained": run["counts"].records_trained,
            "flagged_not_trained": run["counts"].flagged_not_trained,
            "flagged": int(run["flag"].sum()),
            "seconds": round(time.time() - started, 1),
        }
        print(f"[drift {name}] {json.dumps(out['runs'][name])}", file=sys.stderr, flush=True)
    return out


def named_field_detection(
    name: str, rows: list[dict[Any, float]], labels: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """A named-field stream as JSON events, every field a numeric feature: Part 1 under the
    Student-t, and again under the Gaussian (``streamvi_with``)."""
    names = list(rows[0])
    return detection(
        name,
        [orjson.dumps(r) for r in rows],
        rows,
        labels,
        schema_overrides(names),
        args.lof_prefix,
        args.seed,
        schema_overrides(names, GAUSSIAN_NUMERIC),
    )


def detections(args: argparse.Namespace) -> dict[str, Any]:
    """Part 1 on the three streams, drawn in this order from one seeded generator."""
    rng = np.random.default_rng(args.seed)
    results: dict[str, Any] = {}

    rows, labels = shuttle()
    if args.shuttle_records:
        rows, labels = rows[: args.shuttle_records], labels[: args.shuttle_records]
    results["shuttle"] = named_field_detection("shuttle", rows, labels, args)

    x, labels = digits_stream(args.digits_normal, rng)
    values = [encode_record(x[i], f"r{i}", "json") for i in range(len(x))]
    rows = [dict(enumerate(map(float, row))) for row in x]
    results["digits"] = detection(
        "digits", values, rows, labels, DIGITS, args.lof_prefix, args.seed, DIGITS_DATA
    )

    x, labels, names = cancer_stream(args.cancer_passes, rng)
    rows = [dict(zip(names, map(float, row), strict=True)) for row in x]
    results["breast_cancer"] = named_field_detection("breast_cancer", rows, labels, args)

    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a ~5-minute smoke run on shorter streams")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits-normal", type=int, default=10_000)
    parser.add_argument("--cancer-passes", type=int, default=6)
    parser.add_argument("--lof-prefix", type=int, default=3_000)
    parser.add_argument("--shuttle-records", type=int, default=None, help="a prefix (default: all)")
    parser.add_argument("--drift-before", type=int, default=20_000)
    parser.add_argument("--drift-after", type=int, default=15_000)
    parser.add_argument("--parts", default="detection,drift", help="detection, drift or both")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if args.quick:
        args.digits_normal, args.cancer_passes, args.lof_prefix = 3_000, 3, 800
        args.shuttle_records, args.drift_before, args.drift_after = 8_000, 12_000, 4_000

    started = time.time()
    results = detections(args) if "detection" in parts else None
    drift_results = drift(args.drift_before, args.drift_after, args.seed) if "drift" in parts else None
    print(
        json.dumps(
            {
                "benchmark": "anomaly",
                "quick": args.quick,
                "detection": results,
                "drift": drift_results,
                "settings": {
                    "common_overrides": COMMON,
                    "digits_overrides": DIGITS,
                    "digits_streamvi_with": "DIGITS_DATA alone: the common model, no rehearsal",
                    "shuttle_and_breast_cancer": "input.features: every column numeric (Student-t, "
                    "learned scale and degrees of freedom; the Gaussian in streamvi_with), "
                    "input.normalise=true (default warm-up 256)",
                    "other_anomaly_settings": "defaults: threshold_percentile 99, window_records 1000, "
                    "drift_detector adwin (delta 0.002), drift_warmup_records 1000, "
                    "adapt_records_after_drift 5000, train_on_flagged false",
                    "river": "HalfSpaceTrees(seed) after MinMaxScaler; OneClassSVM(nu=0.2) after "
                    "StandardScaler; LocalOutlierFactor(n_neighbors=10) on the first "
                    f"{args.lof_prefix} records",
                    "digits_stream": f"classes 0-8 resampled with replacement to {args.digits_normal}, "
                    f"{round(args.digits_normal * 0.015)} distinct 9s at random positions",
                    "breast_cancer_stream": f"{args.cancer_passes} shuffles of the 357 benign, each with "
                    "25 distinct malignant at random positions",
                    "seed": args.seed,
                },
                "seconds": round(time.time() - started, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
