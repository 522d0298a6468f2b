"""Streaming quality against an offline baseline, per estimator, in one run.

For each estimator: the digits (keyed by digit, so the daemon's hash-selected held-out share is the
same records every pass) are streamed through the daemon for ``--passes`` shuffled passes on the
embedded broker; in the same run the same architecture and objective are trained offline by a plain
TensorFlow loop over the same training records for the same number of epochs (equal samples seen).
Both models are then scored on the held-out records: mean ELBO (averaged over repeated draws) and
an importance-weighted log-likelihood estimate (IWAE-k). Prints one JSON object; the streaming
daemon should be within 1 nat of the offline loop.

Usage: python bench/quality.py [--passes 10] [--estimators sgvb_b,iwae,...] [--k 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from streamvi.config import Settings, load_settings
from streamvi.datasets import encode_record, load_digits
from streamvi.io.admin import ensure_topics
from streamvi.io.base import RawRecord
from streamvi.io.embedded import EmbeddedBroker
from streamvi.runtime import build_daemon, build_trainer, evaluation_policy
from streamvi.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = ["sgvb_a", "sgvb_b", "iwae", "stl", "dreg", "score_function"]


def held_out_mask(settings: Settings, keys: list[bytes]) -> np.ndarray:
    policy = evaluation_policy(settings)
    assert policy is not None, "evaluation.heldout_fraction must be > 0"
    return np.array([policy.reservoir.selects(RawRecord("q", 0, 0, key, None)) for key in keys])


def score(trainer: Trainer, x: np.ndarray, k: int, repeats: int = 20) -> dict[str, float]:
    elbo = np.mean([trainer.evaluate(x).bound.mean() for _ in range(repeats)])
    return {
        "heldout_elbo": round(float(elbo), 3),
        f"heldout_iwae_{k}": round(float(trainer.log_likelihood(x, None, k).mean()), 3),
    }


def stream(settings: Settings, x: np.ndarray, keys: list[bytes], passes: int, seed: int) -> Trainer:
    ensure_topics(settings.kafka)
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, linger_ms=20)
    rng = np.random.default_rng(seed)
    for _ in range(passes):
        for i in rng.permutation(len(x)):
            producer.send(
                settings.kafka.input_topic, key=keys[i], value=encode_record(x[i], keys[i].decode(), "json")
            )
    producer.flush()
    producer.close()
    daemon = build_daemon(settings, CollectorRegistry())
    daemon.run(max_records=passes * len(x))
    return daemon.loop.trainer


def offline(settings: Settings, x_train: np.ndarray, passes: int, seed: int) -> Trainer:
    """A plain TF loop: shuffled epochs, the same model, estimator objective and optimizer."""
    trainer = build_trainer(settings)  # used only for its model, estimator and optimizer objects
    model, estimator, optimizer = trainer.model, trainer.estimator, trainer.optimizer
    variables = trainer.trainable_variables
    batch = settings.training.batch_size
    no_context = tf.zeros((batch, 0))

    @tf.function
    def step(xb: tf.Tensor, seed_pair: tf.Tensor, count: tf.Tensor) -> None:
        with tf.GradientTape() as tape:
            terms = estimator.terms(model, xb, no_context, seed_pair, count)
            loss = estimator.loss(terms, tf.ones(batch))
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)]
        if settings.training.clip_grad_norm is not None:
            grads, _ = tf.clip_by_global_norm(grads, settings.training.clip_grad_norm)
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    rng = np.random.default_rng(seed)
    count = 0
    for _ in range(passes):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order) - batch + 1, batch):
            step(
                tf.constant(x_train[order[start : start + batch]]),
                tf.constant([seed, count], tf.int32),
                tf.constant(count, tf.int64),
            )
            count += 1
    trainer.step_counter.assign(count)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument(
        "--k", type=int, default=256, help="importance samples for the log-likelihood estimate"
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_digits()
    keys = [f"digit-{i}".encode() for i in range(len(data))]
    results = {}
    started = time.time()
    with EmbeddedBroker() as broker:
        for number, name in enumerate(args.estimators.split(",")):
            workdir = Path(tempfile.mkdtemp(prefix="streamvi-quality-"))
            samples = 8 if name in ("iwae", "dreg") else 1
            settings = load_settings(
                args.config,
                [
                    f"kafka.bootstrap_servers={broker.bootstrap_servers}",
                    f"kafka.input_topic=quality-{number}",
                    f"kafka.latents_topic=quality-{number}.latents",
                    f"kafka.metrics_topic=quality-{number}.metrics",
                    f"kafka.dead_letter_topic=quality-{number}.dlq",
                    f"kafka.group_id=quality-{number}",
                    f"snapshots.dir={workdir}",
                    f"training.estimator={name}",
                    f"training.samples={samples}",
                    f"training.seed={args.seed}",
                    "evaluation.heldout_fraction=0.1",
                    "metrics.enabled=false",
                ],
            )
            held = held_out_mask(settings, keys)
            x_held, x_train = data.x[held], data.x[~held]
            streamed = stream(settings, data.x, keys, args.passes, args.seed)
            baseline = offline(settings, x_train, args.passes, args.seed)
            s, o = score(streamed, x_held, args.k), score(baseline, x_held, args.k)
            results[name] = {
                "bound": streamed.estimator.bound_name,
                "stream": s,
                "offline": o,
                "stream_minus_offline_elbo": round(s["heldout_elbo"] - o["heldout_elbo"], 3),
                "stream_minus_offline_iwae": round(
                    s[f"heldout_iwae_{args.k}"] - o[f"heldout_iwae_{args.k}"], 3
                ),
                "within_1_nat": s["heldout_elbo"] >= o["heldout_elbo"] - 1.0,
            }
    print(
        json.dumps(
            {
                "benchmark": "quality",
                "dataset": "digits",
                "passes": args.passes,
                "train_records_per_pass": int((~held).sum()),
                "heldout_records": int(held.sum()),
                "importance_samples": args.k,
                "results": results,
                "seconds": round(time.time() - started, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
