"""Correctness figures of the bounds and the update on small fixed-seed models, as one JSON object.

Every figure is deterministic (fixed seeds, one CPU thread by default) and takes seconds:

- ``gumbel_reported_bound``: Gumbel-softmax latents (relaxed, not straight-through) on the
  9-configuration discrete VAE of tests/unit/discrete_model.py (``DiscreteModel.make(seed=3)``,
  5 records ``dm.sample(5, seed=4)``). For estimators ``sgvb_b`` and ``sgvb_a``: the reported bound
  (``terms.bound``) averaged over 4,000 tiled copies of each record, against the enumerated log p(x)
  and discrete ELBO; ``records_above_log_px`` counts records whose mean exceeds log p(x) by more
  than 4.4 standard errors (a true bound never does).
- ``gumbel_heldout_loglik``: ``log_likelihood_estimate`` (the held-out / ``encode`` IWAE-k) for
  k = 1, 8, 64 on ``DiscreteModel.make(seed=7)``, 4 records, 1,000 tiled copies each: mean estimate
  minus the exact log p(x) per record (positive = above the true log-likelihood: impossible for an
  honest lower bound).
- ``support``: records outside the likelihood's support (Bernoulli x = 3.0; Poisson x = 2.5 and
  -1) through the daemon's decoder: accepted, or the dead-letter reason and detail.
- ``learned_gaussian_scale``: a learned Gaussian observation scale on a stream of 64-record batches
  whose columns 3-5 are constant (0.5): the smallest learned scale and the batch-mean bound at steps
  100, 300 and 600, with ``model.min_observation_scale`` at its default 1e-3 and at 1e-30 (in effect
  none), for a trained decoder and for a frozen one that predicts the constant columns exactly.
- ``non_finite``: (a) score function with the running-mean baseline, 5 normal steps, one step
  whose batch holds a record with x = 1e30 (its log-likelihood is -inf) trained on, then 5 normal
  steps: the running mean and whether each update was applied; (b) SGVB-B with that record held
  out (weight 0) in an otherwise normal batch: the loss and whether the update was applied.
- ``clipping``: score function with a learned baseline and ``training.clip_grad_norm=0.01`` under
  SGD, one step: the reported (model) gradient norm, whether it was clipped, and the norm of the
  baseline network's update / learning rate against that of an identical unclipped trainer (ratio 1
  = the baseline's gradient is not clipped with the model's).
- ``snapshot_mismatch``: a snapshot written under a Gaussian latent (latent_dim 4) restored by a
  loop configured for Gumbel-softmax: the exception type and message.

Usage: python bench/bounds.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.unit.discrete_model

import numpy as np
import tensorflow as tf
import tf_keras

import streamvi
from streamvi.config import Settings, load_settings
from streamvi.estimators import (
    Estimator,
    SGVBAnalyticKL,
    SGVBMonteCarlo,
    build_estimator,
    log_likelihood_estimate,
)
from streamvi.estimators.score_function import ScoreFunction
from streamvi.io.base import RawRecord
from streamvi.io.codecs import DecodeError, RecordDecoder, Support
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.model.likelihoods import GaussianLikelihood
from streamvi.model.vae import build_vae
from streamvi.runtime import build_trainer, snapshot_meta
from streamvi.snapshots import SnapshotStore, encode_offsets
from streamvi.stream import CheckpointPolicy, OnlineLoop, OutputTopics
from streamvi.training.trainer import StepResult, Trainer
from tests.unit.discrete_model import DiscreteModel

#: Standard errors a Monte Carlo mean may stray above log p(x) before it counts as above it.
Z = 4.4


def settings(*overrides: str) -> Settings:
    return load_settings(overrides=list(overrides), environ={})


def step_zero() -> tf.Tensor:
    return tf.constant(0, tf.int64)


def no_context(x: tf.Tensor) -> tf.Tensor:
    return tf.zeros([int(x.shape[0]), 0])


def rounded(values: Any, digits: int = 4) -> Any:
    """Floats (or arrays of them) rounded for the JSON, with non-finite values as strings."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim:
        return [rounded(v, digits) for v in array]
    value = float(array)
    return round(value, digits) if math.isfinite(value) else str(value)


def mean_and_se(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and its standard error of [copies, records] draws."""
    return values.mean(0), values.std(0, ddof=1) / np.sqrt(len(values))


# -- 1, 2: Gumbel-softmax bounds against enumeration ------------------------------------------------


def gumbel_reported_bound(copies: int = 4000) -> dict[str, Any]:
    dm = DiscreteModel.make(seed=3, straight_through=False)
    x = tf.constant(dm.sample(5, seed=4))
    log_px, elbo = dm.log_evidence(x).numpy(), dm.elbo(x).numpy()
    tiled = tf.tile(x, [copies, 1])
    estimators: dict[str, Callable[[], Estimator]] = {"sgvb_b": SGVBAnalyticKL, "sgvb_a": SGVBMonteCarlo}
    out: dict[str, Any] = {
        "log_px_mean": rounded(log_px.mean()),
        "exact_elbo_mean": rounded(elbo.mean()),
    }
    for name, make in estimators.items():
        terms = make().terms(dm.model, tiled, no_context(tiled), tf.constant([5, 0], tf.int32), step_zero())
        mean, se = mean_and_se(terms.bound.numpy().reshape(copies, -1))
        out[name] = {
            "reported_mean": rounded(mean.mean()),
            "reported_minus_exact_elbo": rounded(mean.mean() - elbo.mean()),
            "reported_minus_log_px_per_record": rounded(mean - log_px),
            "standard_error_per_record": rounded(se),
            "records_above_log_px": int(np.sum(mean > log_px + Z * se)),
        }
    return out


def gumbel_heldout_loglik(copies: int = 1000, ks: tuple[int, ...] = (1, 8, 64)) -> dict[str, Any]:
    dm = DiscreteModel.make(seed=7)
    x = tf.constant(dm.sample(4, seed=8))
    log_px = dm.log_evidence(x).numpy()
    tiled = tf.tile(x, [copies, 1])
    out: dict[str, Any] = {"log_px_mean": rounded(log_px.mean())}
    for k in ks:
        seed = tf.constant([k, 1], tf.int32)
        estimates = log_likelihood_estimate(dm.model, tiled, no_context(tiled), k, seed, step_zero())
        mean, se = mean_and_se(estimates.numpy().reshape(copies, -1))
        out[f"k{k}"] = {
            "mean_minus_log_px_per_record": rounded(mean - log_px),
            "mean_minus_log_px": rounded((mean - log_px).mean()),
            "standard_error_per_record": rounded(se),
            "records_above_log_px": int(np.sum(mean > log_px + Z * se)),
        }
    return out


# -- 3: values outside the likelihood's support ----------------------------------------------------


def support() -> dict[str, Any]:
    cases = {
        "bernoulli_3.0": ("bernoulli", b'{"x":[0.5,3.0,0.0,1.0]}'),
        "poisson_2.5": ("poisson", b'{"x":[1.0,2.5,0.0,3.0]}'),
        "poisson_-1": ("poisson", b'{"x":[1.0,-1.0,0.0,3.0]}'),
    }
    out: dict[str, Any] = {}
    for name, (likelihood, value) in cases.items():
        decoder = RecordDecoder("json", 4, 1 << 20, support=Support.of_likelihood(likelihood))
        try:
            decoder.decode(RawRecord("in", 0, 0, None, value))
        except DecodeError as error:
            out[name] = {"accepted": False, "reason": error.reason, "detail": error.detail}
        else:
            out[name] = {"accepted": True}
    return out


# -- 4: a learned Gaussian scale on constant columns -----------------------------------------------


def learned_gaussian_scale(steps: int = 600, report_at: tuple[int, ...] = (100, 300, 600)) -> dict[str, Any]:
    """Both floors on the same stream: the default 1e-3, and 1e-30 (no floor in effect)."""
    return {
        "trained_decoder": {
            f"floor_{floor:g}": _scale_run(floor, False, steps, report_at) for floor in (1e-3, 1e-30)
        },
        "exact_decoder": {
            f"floor_{floor:g}": _scale_run(floor, True, steps, report_at) for floor in (1e-3, 1e-30)
        },
    }


def _scale_run(floor: float, exact_decoder: bool, steps: int, report_at: tuple[int, ...]) -> dict[str, Any]:
    """A learned scale on a stream whose columns 3-5 are constant (0.5). ``exact_decoder``: a
    frozen linear decoder that predicts those columns exactly (the limit a trained one approaches)."""
    hidden = (
        ("model.encoder_hidden=[]", "model.decoder_hidden=[]")
        if exact_decoder
        else ("model.encoder_hidden=[16]",)
    )
    config = settings(
        "input.dim=6",
        "model.likelihood=gaussian",
        "model.learn_observation_scale=true",
        "model.observation_scale=1.0",
        f"model.min_observation_scale={floor}",
        *hidden,
        "model.latent_dim=2",
        "training.batch_size=64",
        "training.learning_rate=0.05",
        "training.clip_grad_norm=null",
        "evaluation.heldout_fraction=0",
    )
    model = build_vae(config.model, config.training, config.input.dim)
    if exact_decoder:
        layer = model.decoder.layers[-1]
        layer.set_weights([np.zeros((2, 6), np.float32), np.array([0, 0, 0, 0.5, 0.5, 0.5], np.float32)])
        model.decoder.trainable = False
    trainer = Trainer.from_settings(model, build_estimator(config), config.training)
    likelihood = trainer.model.likelihood
    assert isinstance(likelihood, GaussianLikelihood)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for step in range(1, steps + 1):
        x = np.full((64, 6), 0.5, dtype=np.float32)
        x[:, :3] = rng.normal(size=(64, 3))
        result = trainer.train(x, 64)
        if step in report_at:
            out[f"step_{step}"] = {
                "min_scale": float(f"{float(tf.reduce_min(likelihood.observation_scale())):.4g}"),
                "mean_bound": rounded(result.scores.bound.mean()),
            }
    return out


# -- 5, 6: a non-finite record and gradient clipping -----------------------------------------------

GAUSSIAN_SMALL = (
    "input.dim=4",
    "model.likelihood=gaussian",
    "model.observation_scale=0.5",
    "model.encoder_hidden=[8]",
    "training.batch_size=16",
    "training.clip_grad_norm=null",
)
HUGE = 1e30  # finite in float32; its square overflows, so its Gaussian log-likelihood is -inf


def normal_batch(rng: np.random.Generator, batch: int = 16, dim: int = 4) -> np.ndarray:
    return rng.normal(size=(batch, dim)).astype(np.float32)


def non_finite() -> dict[str, Any]:
    trainer = build_trainer(settings(*GAUSSIAN_SMALL, "training.estimator=score_function"))
    estimator = trainer.estimator
    assert isinstance(estimator, ScoreFunction)
    rng = np.random.default_rng(1)
    running_means, applied, losses = [], [], []
    for step in range(11):
        x = normal_batch(rng)
        if step == 5:
            x[0, 0] = HUGE
        result = trainer.train(x, 16, weights=np.ones(16, np.float32))
        running_means.append(float(estimator.running_mean()))
        applied.append(result.applied)
        losses.append(result.loss)
    score_function = {
        "outlier_step": 6,
        "running_mean_after_each_step": rounded(running_means),
        "applied": applied,
        "loss": rounded(losses),
    }
    trainer = build_trainer(settings(*GAUSSIAN_SMALL, "training.estimator=sgvb_b"))
    x = normal_batch(np.random.default_rng(2))
    x[0, 0] = HUGE
    weights = np.ones(16, np.float32)
    weights[0] = 0.0
    result = trainer.train(x, 16, weights=weights)
    held_out = {
        "loss": rounded(result.loss),
        "applied": result.applied,
        "held_out_row_bound": rounded(result.scores.bound[0]),
    }
    return {"score_function_running_mean": score_function, "sgvb_b_held_out_outlier": held_out}


def _baseline_update_over_lr(clip: str) -> tuple[float, float, StepResult]:
    """One SGD step of a learned-baseline score-function trainer: the norms of the baseline's and
    the model's updates divided by the learning rate, and the step's result."""
    lr = 0.01
    tf_keras.utils.set_random_seed(0)  # for any initializer that draws from the global seed
    trainer = build_trainer(
        settings(
            *GAUSSIAN_SMALL,
            "training.estimator=score_function",
            "training.baseline=learned",
            "training.baseline_hidden=8",
            "training.optimizer=sgd",
            f"training.learning_rate={lr}",
            f"training.clip_grad_norm={clip}",
        )
    )
    estimator = trainer.estimator
    assert isinstance(estimator, ScoreFunction) and estimator.network is not None
    baseline_vars, model_vars = estimator.network.trainable_variables, trainer.model.trainable_variables
    baseline_before = [v.numpy().copy() for v in baseline_vars]
    model_before = [v.numpy().copy() for v in model_vars]
    result = trainer.train(normal_batch(np.random.default_rng(3)), 16)

    def norm(variables: Sequence[tf.Variable], before: list[np.ndarray]) -> float:
        deltas = [v.numpy() - b for v, b in zip(variables, before, strict=True)]
        return float(np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in deltas))) / lr

    return norm(baseline_vars, baseline_before), norm(model_vars, model_before), result


def clipping() -> dict[str, Any]:
    baseline_clipped, model_clipped, result = _baseline_update_over_lr("0.01")
    baseline_free, model_free, free = _baseline_update_over_lr("null")
    return {
        "clip_grad_norm": 0.01,
        "grad_norm_reported": rounded(result.grad_norm, 6),
        "clipped": result.clipped,
        "model_update_over_lr": rounded(model_clipped, 6),
        "baseline_update_over_lr": rounded(baseline_clipped, 6),
        "unclipped_trainer": {
            "grad_norm_reported": rounded(free.grad_norm, 6),
            "model_update_over_lr": rounded(model_free, 6),
            "baseline_update_over_lr": rounded(baseline_free, 6),
        },
        "baseline_ratio_clipped_to_unclipped": rounded(baseline_clipped / baseline_free, 6),
    }


# -- 7: a snapshot written under other structural settings -----------------------------------------

SNAPSHOT_SMALL = (
    "input.dim=6",
    "model.encoder_hidden=[8]",
    "training.batch_size=4",
    "training.estimator=sgvb_a",
)


def snapshot_mismatch() -> dict[str, Any]:
    written = settings(*SNAPSHOT_SMALL, "model.latent=gaussian", "model.latent_dim=4")
    config = settings(*SNAPSHOT_SMALL, "model.latent=gumbel_softmax")
    with tempfile.TemporaryDirectory(prefix="streamvi-bounds-") as directory:
        meta = dict(snapshot_meta(written), offsets=encode_offsets({("in", 0): 3}))
        checkpoint = tf.train.Checkpoint(**build_trainer(written).checkpoint_objects())
        path = SnapshotStore(Path(directory)).write(checkpoint, 0, meta).path
        loop = OnlineLoop(
            source=MemorySource([]),
            sink=MemorySink(),
            decoder=RecordDecoder("json", config.input.dim, 4096),
            trainer=build_trainer(config),
            store=SnapshotStore(Path(directory)),
            topics=OutputTopics("lat", "met", "dlq"),
            policy=CheckpointPolicy(every_steps=1, every_seconds=3600),
            max_batch_latency_seconds=5.0,
            snapshot_meta=snapshot_meta(config),
        )
        try:
            loop.restore()
        except Exception as error:  # the figure is whatever is raised
            message = str(error).replace(str(path), "<snapshot>").replace(directory, "<snapshots.dir>")
            return {"exception": type(error).__name__, "message": message.splitlines()}
    return {"exception": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra- and inter-op threads")
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    figures = {
        "streamvi": str(Path(streamvi.__file__).resolve().parent),
        "gumbel_reported_bound": gumbel_reported_bound(),
        "gumbel_heldout_loglik": gumbel_heldout_loglik(),
        "support": support(),
        "learned_gaussian_scale": learned_gaussian_scale(),
        "non_finite": non_finite(),
        "clipping": clipping(),
        "snapshot_mismatch": snapshot_mismatch(),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
