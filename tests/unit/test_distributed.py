"""The all-reduced step of two real worker processes equals one single-process step on the union.

Two ``MultiWorkerMirroredStrategy`` workers on localhost (TF_CONFIG, free ports) each take their
half of a batch; a single process with ``Trainer(draw_blocks=2)`` on the concatenated batch makes
the same latent draws (block k seeded like worker k), so both must give the same parameters.

Tolerance: float32 with SGD (lr 0.5). The two sides sum the same per-record gradients in another
order (per worker, then across workers, versus one batch) and divide by the weight at a different
point, so they differ by rounding only (measured: at most 3e-8 in any parameter, a few float32
ulps, and the same loss to all printed digits); 1e-5 absolute leaves room for other CPUs' kernels
and is far below the update itself (0.16 at most, checked to be > 1e-2).
SGD rather than Adam: Adam's first step is lr * g / (|g| + eps), which turns rounding in a
gradient entry near 0 into a difference up to 2 lr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamvi.io.embedded import free_port
from tests.unit import distributed_worker as worker

ATOL = 1e-5


def run_workers(tmp_path: Path, scenario: str = "plain") -> list[dict[str, np.ndarray]]:
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(worker.WORKERS)]
    processes, outputs = [], []
    for index in range(worker.WORKERS):
        tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2"}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
        out = tmp_path / f"worker{index}.npz"
        log = (tmp_path / f"worker{index}.log").open("w")
        processes.append(
            subprocess.Popen(
                [sys.executable, worker.__file__, str(index), str(out), scenario],
                env=env,
                stdout=log,
                stderr=log,
            )
        )
        outputs.append(out)
    try:
        for index, process in enumerate(processes):
            code = process.wait(timeout=400)
            log_text = (tmp_path / f"worker{index}.log").read_text()[-3000:]
            assert code == 0, f"worker {index} failed:\n{log_text}"
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return [dict(np.load(out)) for out in outputs]


def reference_steps(scenario: str = "plain") -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """One process, batch 16 in two draw blocks, the same steps on the union."""
    from streamvi.config import load_settings
    from streamvi.estimators import build_estimator
    from streamvi.model.vae import build_vae
    from streamvi.training.trainer import Trainer

    overrides = [o for o in worker.scenario_overrides(scenario) if not o.startswith("training.batch_size")]
    settings = load_settings(overrides=[*overrides, "training.batch_size=16"], environ={})
    model = build_vae(
        settings.model, settings.training, settings.input.dim, settings.input.context_dim, settings.input
    )
    trainer = Trainer.from_settings(model, build_estimator(settings), settings.training, draw_blocks=2)
    initial = [v.numpy().copy() for v in trainer.model.trainable_variables]
    steps = []
    for rows, _ in worker.scenario_batches(scenario):
        result = trainer.train_rows(rows.copy(), worker.WORKERS * worker.BATCH)
        steps.append(
            {
                "step": result.step,
                "loss": result.loss,
                "grad_norm": result.grad_norm,
                "trained": result.trained_records,
                "bound": result.scores.bound,
                "params": [v.numpy().copy() for v in trainer.model.trainable_variables],
                "moments": [v.numpy().copy() for v in trainer.model.input_state()],
                "estimator": [v.numpy().copy() for v in trainer.estimator.state()],
            }
        )
    return steps, initial


@pytest.mark.slow
def test_two_workers_make_the_single_process_step_on_the_union(tmp_path: Path) -> None:
    results = run_workers(tmp_path)
    reference, initial = reference_steps()
    assert [int(r["worker_index"]) for r in results] == [0, 1]
    # the chief's parameters were broadcast over worker 1's perturbed ones
    assert str(results[0]["checksum_0"]) == str(results[1]["checksum_0"])
    for step, expected in enumerate(reference, start=1):
        for r in results:
            step_count, loss, grad_norm, union_trained, _ = r[f"figures_{step}"]
            assert int(step_count) == expected["step"] == step
            assert int(union_trained) == expected["trained"]
            np.testing.assert_allclose(loss, expected["loss"], rtol=1e-5)
            np.testing.assert_allclose(grad_norm, expected["grad_norm"], rtol=1e-5)
            for i, param in enumerate(expected["params"]):
                np.testing.assert_allclose(r[f"param_{step}_{i}"], param, rtol=0, atol=ATOL)
        # identical on both workers, bit for bit: the same reduced gradient on the same parameters
        assert str(results[0][f"checksum_{step}"]) == str(results[1][f"checksum_{step}"])
        # each worker's prequential scores are its block of the union's
        counts = worker.batches()[step - 1][1]
        for k, r in enumerate(results):
            block = expected["bound"][k * worker.BATCH : k * worker.BATCH + counts[k]]
            np.testing.assert_allclose(r[f"bound_{step}"], block, rtol=1e-5, atol=1e-5)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(reference[0]["params"], initial, strict=True))
    assert moved > 1e-2  # the tolerance is far below the update it checks
    # step 2: worker 1 was empty, yet took part and trained the union's (worker 0's) 8 records
    assert int(results[1]["figures_2"][4]) == 0 and int(results[1]["figures_2"][3]) == 8
    # lockstep rounds over the real collective: every worker reads the same agreement
    expected_rounds = [[1, 3, 0, 0], [0, 0, 0, 1], [1, 2, 1, 0]]
    for r in results:
        assert r["rounds"].tolist() == expected_rounds
        # every worker's offsets, gathered exactly (int64, not float) to every worker
        assert r["offsets"].tolist() == [[0, 17], [1, 2**60 + 5], [3, 9]]


@pytest.mark.slow
def test_two_workers_share_one_normaliser_and_match_the_single_process_steps(tmp_path: Path) -> None:
    """The online normaliser under distributed steps: both workers fold the union's trained rows
    (missing values skipped), so its moments, its warm-up and the parameters stay equal everywhere
    and equal a single process's on the concatenated batches. The moments are float64 sums of the
    same values in another grouping: 1e-9 relative is rounding; parameters as in the plain test."""
    results = run_workers(tmp_path, "normalised")
    reference, initial = reference_steps("normalised")
    steps = worker.normalised_batches()
    for step, expected in enumerate(reference, start=1):
        for r in results:
            step_count, _, _, union_trained, _ = r[f"figures_{step}"]
            assert int(step_count) == expected["step"] == step
            assert int(union_trained) == expected["trained"]
            for i, moments in enumerate(expected["moments"]):
                np.testing.assert_allclose(r[f"moments_{step}_{i}"], moments, rtol=1e-9, atol=0)
            for i, param in enumerate(expected["params"]):
                np.testing.assert_allclose(r[f"param_{step}_{i}"], param, rtol=0, atol=ATOL)
        assert str(results[0][f"checksum_{step}"]) == str(results[1][f"checksum_{step}"])
    # the first two steps fall inside the warm-up: the normaliser folds, the parameters stay
    for step in (1, 2):
        for i, param in enumerate(initial):
            np.testing.assert_array_equal(results[0][f"param_{step}_{i}"], param)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(reference[2]["params"], initial, strict=True))
    assert moved > 1e-2
    # after three steps: the two-pass moments of every trained row's observed numeric values
    trained = np.concatenate([rows[rows[:, -1] > 0, :3] for rows, _ in steps]).astype(np.float64)
    records, count, mean, m2 = (results[1][f"moments_3_{i}"] for i in range(4))
    assert int(records) == len(trained) == 6 + 3 + 8 + 4 + 7 + 8
    np.testing.assert_array_equal(count, (~np.isnan(trained)).sum(axis=0))
    np.testing.assert_allclose(mean, np.nanmean(trained, axis=0), rtol=1e-12)
    np.testing.assert_allclose(m2 / count, np.nanvar(trained, axis=0), rtol=1e-9)


@pytest.mark.slow
def test_two_workers_share_one_score_function_baseline(tmp_path: Path) -> None:
    """The score-function estimator's running-mean baseline under distributed steps: every worker
    folds the union's learning-signal sum and weight, so the baseline (which shapes the next
    step's gradient) and the parameters equal a single process's on the concatenated batches.
    The baseline sums the same float32 signals in another grouping: 1e-5 relative is rounding."""
    results = run_workers(tmp_path, "baseline")
    reference, initial = reference_steps("baseline")
    for step, expected in enumerate(reference, start=1):
        for r in results:
            assert int(r[f"figures_{step}"][0]) == expected["step"] == step
            for i, value in enumerate(expected["estimator"]):
                np.testing.assert_allclose(r[f"estimator_{step}_{i}"], value, rtol=1e-5)
            for i, param in enumerate(expected["params"]):
                np.testing.assert_allclose(r[f"param_{step}_{i}"], param, rtol=0, atol=ATOL)
        assert str(results[0][f"checksum_{step}"]) == str(results[1][f"checksum_{step}"])
    running_sum, running_weight = (results[0][f"estimator_2_{i}"] for i in range(2))
    assert float(running_weight) > 0 and float(running_sum) != 0  # the baseline did move
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(reference[1]["params"], initial, strict=True))
    assert moved > 1e-2
