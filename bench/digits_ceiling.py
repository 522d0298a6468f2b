"""How far detectors fitted offline get on bench/anomaly.py's digits stream (the 9s as rare
anomalies), and whether ILOF's score there comes from the stream's repeated records.

Prints one JSON object:

- ``offline``: scikit-learn detectors fitted offline on half of the normal digits (0-8), scoring the
  other half and every 9 (ROC AUC): a full-covariance GaussianMixture, LocalOutlierFactor (novelty
  mode, 10 neighbours) and PCA reconstruction error. What a density of the digits can reach.
- ``ilof_prefix``: River's ILOF on the stream's first ``--lof-prefix`` records, as bench/anomaly.py
  scores it, and again counting only the normal records that are no copy of an earlier one (the
  stream resamples 1,617 normal digits, so most records repeat one): whether ILOF's lead comes
  from recognising repeats.

The daemon's own settings on this stream are compared in bench/rehearsal.py.

Usage: python bench/digits_ceiling.py [--lof-prefix 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import LocalOutlierFactor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anomaly import digits_stream, ranking, river_scores


def offline(seed: int) -> dict[str, float]:
    """Detectors fitted on half of the normal digits, scored on the other half and every 9."""
    data = load_digits()
    x, y = data.data / 16.0, data.target
    normal = np.random.default_rng(seed).permutation(np.flatnonzero(y != 9))
    fit, held = normal[: len(normal) // 2], normal[len(normal) // 2 :]
    test = np.concatenate([x[held], x[y == 9]])
    labels = np.r_[np.zeros(len(held)), np.ones(int((y == 9).sum()))]
    pca = PCA(16, random_state=seed).fit(x[fit])
    scores = {
        "gaussian_mixture_10_full": -GaussianMixture(
            10, covariance_type="full", reg_covar=1e-2, random_state=seed
        )
        .fit(x[fit])
        .score_samples(test),
        "local_outlier_factor_10": -LocalOutlierFactor(10, novelty=True).fit(x[fit]).score_samples(test),
        "pca_16_reconstruction_error": ((test - pca.inverse_transform(pca.transform(test))) ** 2).sum(1),
    }
    return {name: round(float(roc_auc_score(labels, s)), 4) for name, s in scores.items()}


def ilof_prefix(x: np.ndarray, labels: np.ndarray, prefix: int, seed: int) -> dict[str, Any]:
    seen: set[bytes] = set()
    repeat = np.zeros(prefix, dtype=bool)
    for i in range(prefix):
        key = x[i].tobytes()
        repeat[i] = key in seen
        seen.add(key)
    rows = [dict(enumerate(map(float, row))) for row in x[:prefix]]
    scores = river_scores(rows, ["local_outlier_factor"], seed)["local_outlier_factor"]
    normal = labels[:prefix] == 0
    first = ~repeat
    return {
        "records": prefix,
        "normal_records_repeating_an_earlier_one": round(float(repeat[normal].mean()), 4),
        "every_record": ranking(labels[:prefix], scores),
        "first_occurrences_only": ranking(labels[:prefix][first], scores[first]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits-normal", type=int, default=10_000)
    parser.add_argument("--lof-prefix", type=int, default=3_000)
    args = parser.parse_args()
    # the stream bench/anomaly.py builds with the same seed (digits is the first stream it draws)
    x, labels = digits_stream(args.digits_normal, np.random.default_rng(args.seed))
    print(
        json.dumps(
            {
                "benchmark": "digits_ceiling",
                "stream": f"classes 0-8 resampled to {args.digits_normal}, distinct 9s, seed {args.seed}",
                "offline": offline(args.seed),
                "ilof_prefix": ilof_prefix(x, labels, args.lof_prefix, args.seed),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
