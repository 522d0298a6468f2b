"""One trainer worker of a localhost cluster for tests/unit/test_distributed.py (run as a script).

    TF_CONFIG=... python distributed_worker.py INDEX OUT.npz [plain|normalised|baseline]

Builds the strategy from TF_CONFIG (set by the test, as TensorFlow reads it), perturbs worker 1's
parameters so the chief's broadcast is visible, then runs the steps of :func:`batches` on its share
of each batch and saves parameters, checksums and step figures after each. The ``normalised``
scenario trains a feature-schema model whose online normaliser must stay equal on both workers,
the ``baseline`` one the score-function estimator with its running-mean baseline.
"""

from __future__ import annotations

import sys

import numpy as np

# the settings, batches and steps both sides of the comparison use
OVERRIDES = [
    "input.dim=6",
    "model.latent_dim=2",
    "model.encoder_hidden=[16]",
    "training.batch_size=8",
    "training.optimizer=sgd",
    "training.learning_rate=0.5",
    "training.clip_grad_norm=null",
    "training.seed=7",
    "training.samples=2",
]
WORKERS, BATCH, DIM = 2, 8, 6

#: The normalised scenario: three numeric features on scales 1e-3, 1 and 1e3 (sometimes missing)
#: and a binary one, standardised by the online normaliser after a warm-up of 10 records.
FEATURES = (
    "[{name: a, type: numeric}, {name: b, type: numeric}, {name: c, type: numeric}, {name: d, type: binary}]"
)
NORMALISED = [
    f"input.features={FEATURES}",
    "input.normalise_warmup=10",
    *[o for o in OVERRIDES if not o.startswith("input.dim")],
]
FEATURE_DIM = 4


#: The baseline scenario: the score-function estimator with its running-mean baseline.
BASELINE = [*OVERRIDES, "training.estimator=score_function", "training.baseline=running_mean"]


def scenario_overrides(scenario: str) -> list[str]:
    return {"normalised": NORMALISED, "baseline": BASELINE}.get(scenario, OVERRIDES)


def scenario_batches(scenario: str) -> list[tuple[np.ndarray, list[int]]]:
    return normalised_batches() if scenario == "normalised" else batches()


def normalised_batches() -> list[tuple[np.ndarray, list[int]]]:
    """Three steps of raw feature rows: the first two inside the warm-up (6 + 3, then 8 + 4 real
    records: parameters stay, the normaliser folds both workers' rows), the third an update on
    standardised values; 10% of numeric values missing (NaN)."""
    rng = np.random.default_rng(5)
    scales = np.array([1e-3, 1.0, 1e3])
    steps = []
    for counts in ([6, 3], [8, 4], [7, 8]):
        rows = np.zeros((WORKERS * BATCH, FEATURE_DIM + 1), dtype=np.float32)
        numeric = rng.normal(5.0, 2.0, size=(WORKERS * BATCH, 3)) * scales
        numeric[rng.random(numeric.shape) < 0.1] = np.nan
        rows[:, :3] = numeric
        rows[:, 3] = rng.random(WORKERS * BATCH) < 0.5
        for k, n in enumerate(counts):
            rows[k * BATCH : k * BATCH + n, -1] = 1.0
            rows[k * BATCH + n : (k + 1) * BATCH, :FEATURE_DIM] = 0.0  # padding rows
        steps.append((rows, counts))
    return steps


def batches() -> list[tuple[np.ndarray, list[int]]]:
    """Per step: the union's [x | weight] rows (worker k's block is rows kB..(k+1)B) and each
    worker's real-record count. Step 1: worker 0 full with one held-out row, worker 1 with 5 real
    records and 3 padding rows; step 2: worker 1 empty (weight 0 throughout)."""
    rng = np.random.default_rng(3)
    steps = []
    for counts, heldout in (([8, 5], [2]), ([8, 0], [])):
        rows = np.zeros((WORKERS * BATCH, DIM + 1), dtype=np.float32)
        rows[:, :DIM] = (rng.random((WORKERS * BATCH, DIM)) < 0.4).astype(np.float32)
        for k, n in enumerate(counts):
            rows[k * BATCH : k * BATCH + n, -1] = 1.0
            rows[k * BATCH + n : (k + 1) * BATCH, :DIM] = 0.0  # padding rows
        rows[heldout, -1] = 0.0  # a held-out record: scored, never trained on
        steps.append((rows, counts))
    return steps


def main(index: int, out: str, scenario: str) -> None:
    from streamvi.cluster import resolve_cluster
    from streamvi.config import load_settings

    overrides = [*scenario_overrides(scenario), "distribution.strategy=multi_worker"]
    settings = load_settings(overrides=overrides, environ={})
    import os

    cluster = resolve_cluster(settings.distribution, os.environ)
    assert cluster is not None and cluster.index == index

    from streamvi.training.distributed import build_distributed_trainer, build_strategy

    strategy = build_strategy(cluster)
    trainer = build_distributed_trainer(settings, strategy)
    if index == 1:
        first = trainer.model.trainable_variables[0]
        first.assign_add(np.ones(first.shape, np.float32))
    trainer.sync_from_chief()
    saved: dict[str, np.ndarray] = {"worker_index": np.array(trainer.worker_index)}
    saved["checksum_0"] = np.array(trainer.checksum())
    for step, (rows, counts) in enumerate(scenario_batches(scenario), start=1):
        mine = rows[index * BATCH : (index + 1) * BATCH]
        result = trainer.train_rows(np.ascontiguousarray(mine), counts[index])
        saved[f"figures_{step}"] = np.array(
            [result.step, result.loss, result.grad_norm, result.union_trained_records, result.trained_records]
        )
        saved[f"bound_{step}"] = result.scores.bound
        saved[f"checksum_{step}"] = np.array(trainer.checksum())
        for i, variable in enumerate(trainer.model.trainable_variables):
            saved[f"param_{step}_{i}"] = variable.numpy()
        for i, variable in enumerate(trainer.model.input_state()):
            saved[f"moments_{step}_{i}"] = variable.numpy()
        for i, variable in enumerate(trainer.estimator.state()):
            saved[f"estimator_{step}_{i}"] = variable.numpy()
    if scenario != "plain":
        np.savez(out, **saved)
        return
    saved["rounds"] = np.array([_agreement(a) for a in lockstep_rounds(trainer, index)])
    from streamvi.training.lockstep import gather_offsets

    merged = gather_offsets(trainer, "in", OFFSETS[index])
    saved["offsets"] = np.array(sorted((p, o) for (_, p), o in merged.items()), dtype=np.int64)
    np.savez(out, **saved)


#: Each worker's next offsets of topic "in" (worker 1 beyond float64's exact integers).
OFFSETS = [{("in", 0): 17}, {("in", 3): 9, ("in", 1): 2**60 + 5}]

#: Per round, each worker's Round: worker 0 due with 3 records while worker 1 is idle; both idle;
#: worker 1 stopping while worker 0 holds 2 records.
ROUNDS = [
    ((3, False, True, False), (0, False, False, False)),
    ((0, False, False, False), (0, False, False, False)),
    ((2, False, False, False), (0, False, False, True)),
]


def lockstep_rounds(trainer, index: int) -> list:
    from streamvi.training.lockstep import Round, agree

    return [agree(trainer, Round(*mine[index])) for mine in ROUNDS]


def _agreement(agreement) -> list[int]:
    return [int(agreement.close), agreement.rows, int(agreement.stop), int(agreement.idle)]


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "plain")
