"""Every estimator x latent family x likelihood that makes sense learns on a stream.

Each case runs the online loop (in-memory source and sink) over three passes of the digits, with
a held-out share selected by key hash. Held-out records are scored by the untrained model and
again by the trained one; the paired per-record improvement must be positive by more than five
standard errors, and every reported loss and bound must be finite throughout.
"""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from streamvi.config import load_settings
from streamvi.datasets import encode_record, load_digits
from streamvi.io.base import RawRecord
from streamvi.io.codecs import RecordDecoder
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.metrics import Metrics
from streamvi.runtime import build_trainer, evaluation_policy
from streamvi.snapshots import SnapshotStore
from streamvi.stream import CheckpointPolicy, OnlineLoop, OutputTopics

ESTIMATORS = ["sgvb_a", "sgvb_b", "iwae", "stl", "dreg", "score_function"]
CASES = (
    [(e, "gaussian", "bernoulli", ()) for e in ESTIMATORS]
    + [(e, "gumbel_softmax", "bernoulli", ()) for e in ESTIMATORS]
    + [
        ("sgvb_b", "gumbel_softmax", "bernoulli", ("model.straight_through=true",)),
        ("score_function", "gaussian", "bernoulli", ("training.baseline=learned",)),
        ("sgvb_b", "gaussian", "gaussian", ("model.observation_scale=0.3",)),
        (
            "sgvb_b",
            "gaussian",
            "gaussian",
            ("model.learn_observation_scale=true", "model.observation_scale=1.0"),
        ),
        ("iwae", "gaussian", "poisson", ()),
        ("sgvb_b", "gaussian", "continuous_bernoulli", ()),  # grey levels with a true density
        ("sgvb_b", "gaussian", "bernoulli", ("input.context_dim=10",)),  # conditional VAE on the label
    ]
)


def case_id(case) -> str:
    estimator, latent, likelihood, extra = case
    return "-".join([estimator, latent, likelihood, *[e.split("=")[0].split(".")[-1] for e in extra]])


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_learns_on_a_stream(case, tmp_path):
    estimator, latent, likelihood, extra = case
    settings = load_settings(
        overrides=[
            "input.dim=64",
            f"training.estimator={estimator}",
            "training.samples=4" if estimator in ("iwae", "dreg") else "training.samples=1",
            f"model.latent={latent}",
            f"model.likelihood={likelihood}",
            # only the settings of the latent family in use: the others would be refused
            *(
                ["model.latent_dim=4"]
                if latent == "gaussian"
                else ["model.categorical_variables=4", "model.categories=4"]
            ),
            "model.encoder_hidden=[64]",
            "model.activation=elu",
            "training.batch_size=64",
            "training.learning_rate=0.005",
            "evaluation.heldout_fraction=0.1",
            "evaluation.every_steps=20",
            "evaluation.importance_samples=8",
            *extra,
        ],
        environ={},
    )
    data = load_digits()
    scale = 16.0 if likelihood == "poisson" else 1.0  # raw pixel counts 0..16 for the Poisson model
    context_dim = settings.input.context_dim
    records = []
    for offset in range(3 * len(data)):
        i = offset % len(data)
        context = np.eye(10, dtype=np.float32)[data.labels[i]] if context_dim else None
        value = encode_record(data.x[i] * scale, f"d{i}", "json", context=context)
        records.append(RawRecord("in", 0, offset, f"d{i}".encode(), value))

    trainer = build_trainer(settings)
    evaluation = evaluation_policy(settings)
    assert evaluation is not None
    held = [i for i in range(len(data)) if evaluation.reservoir.selects(records[i])]
    x_held = data.x[held] * scale
    c_held = np.eye(10, dtype=np.float32)[data.labels[held]] if context_dim else None
    before = trainer.evaluate(x_held, c_held).bound

    sink = MemorySink()
    loop = OnlineLoop(
        source=MemorySource(records),
        sink=sink,
        decoder=RecordDecoder("json", 64, 1 << 20, context_dim),
        trainer=trainer,
        store=SnapshotStore(tmp_path),
        topics=OutputTopics("lat", "met", "dlq"),
        policy=CheckpointPolicy(every_steps=10_000, every_seconds=3600),
        max_batch_latency_seconds=1.0,
        metrics=Metrics(CollectorRegistry()),
        evaluation=evaluation,
    )
    counts = loop.run(max_records=len(records))
    assert counts.records_trained == len(records) - 3 * len(held)  # held-out records are never trained on

    after = trainer.evaluate(x_held, c_held).bound
    gain = after - before
    assert gain.mean() > 5 * gain.std(ddof=1) / math.sqrt(len(gain)), (before.mean(), after.mean())

    messages = [orjson.loads(m.value) for m in sink.on_topic("met")]
    steps = [m for m in messages if m["kind"] == "step"]
    heldout = [m for m in messages if m["kind"] == "heldout"]
    assert steps and all(m["loss"] is not None and m["elbo"] is not None for m in steps)
    assert heldout and all(m["log_likelihood"] is not None for m in heldout)
    assert heldout[-1]["elbo"] > heldout[0]["elbo"]
    assert all(m["bound"] == trainer.estimator.bound_name for m in steps)
    latents = [orjson.loads(m.value) for m in sink.on_topic("lat")]
    assert len(latents) == len(records) and all(math.isfinite(m["elbo"]) for m in latents)
