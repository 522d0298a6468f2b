"""Calibrated percentiles, drift detection and the anomaly monitor's decisions and state.

Known answers: percentiles against numpy on the same scores, within the KLL sketch's stated rank
error; River's detectors on synthetic streams with a known shift, with rates and their binomial
(Wilson) intervals over fixed seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamvi.anomaly.calibration import ScoreReference
from streamvi.anomaly.drift import DriftDetector
from streamvi.anomaly.monitor import AnomalyMonitor, Thresholds
from streamvi.config import AnomalySettings


def wilson(successes: int, trials: int, z: float = 2.576) -> tuple[float, float]:
    """The 99% Wilson score interval of a binomial rate."""
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return centre - half, centre + half


# -- percentiles ------------------------------------------------------------------------------------
def test_percentiles_match_numpy_within_the_sketchs_stated_rank_error():
    rng = np.random.default_rng(0)
    scores = rng.gumbel(-80.0, 6.0, size=50_000).astype(np.float32)  # ELBO-like: a long lower tail
    reference = ScoreReference(window_records=100_000, min_records=100, k=200)
    reference.update(scores)
    queries = np.quantile(scores, np.linspace(0.001, 0.999, 400))
    expected = 100.0 * np.mean(scores[None, :] > queries[:, None].astype(np.float32), axis=1)
    got = reference.percentiles(queries)
    assert got is not None
    # KLL's single-query normalised rank error at k=200 (99% confidence), in percent
    bound = 100.0 * reference.rank_error
    assert np.max(np.abs(got - expected)) <= bound
    threshold = reference.threshold_elbo(99.0)
    assert abs(100.0 * np.mean(scores > threshold) - 99.0) <= bound


def test_percentiles_are_none_until_calibrated_and_nan_for_non_finite_scores():
    reference = ScoreReference(window_records=1000, min_records=50)
    reference.update(np.arange(49, dtype=np.float32))
    assert reference.percentiles(np.zeros(3)) is None and math.isnan(reference.threshold_elbo(99.0))
    reference.update(np.array([np.nan, np.inf, 49.0], dtype=np.float32))  # non-finite ones are left out
    assert reference.records == 50
    got = reference.percentiles(np.array([-1.0, 100.0, np.nan, 24.5]))
    assert got is not None
    assert got[0] == 100.0 and got[1] == 0.0 and math.isnan(got[2]) and got[3] == pytest.approx(50.0, abs=2)


def test_reference_rests_on_the_last_one_or_two_windows():
    reference = ScoreReference(window_records=1000, min_records=10)
    reference.update(np.full(3000, -100.0, np.float32))  # three old windows
    reference.update(np.full(1000, -10.0, np.float32))  # one window of the new stream
    assert reference.records == 1000 + 0  # the new window filled and rotated: previous=new, current empty
    got = reference.percentiles(np.array([-50.0]))
    assert got is not None and got[0] == 100.0  # every reference score is the new stream's (-10)
    reference.update(np.full(500, -100.0, np.float32))
    assert reference.records == 1500
    got = reference.percentiles(np.array([-50.0]))
    assert got is not None and got[0] == pytest.approx(100.0 * 1000 / 1500, abs=1.0)


def test_reference_state_round_trips_through_serialisation():
    rng = np.random.default_rng(1)
    reference = ScoreReference(window_records=700, min_records=10)
    reference.update(rng.normal(size=1000).astype(np.float32))
    restored = ScoreReference(window_records=700, min_records=10)
    restored.load(reference.state())
    queries = np.linspace(-3, 3, 25)
    assert restored.records == reference.records == 1000
    assert restored.state() == reference.state()  # the sketches themselves, byte for byte
    # KLL merges the two windows at random: answers agree within the stated rank error
    got, saved = restored.percentiles(queries), reference.percentiles(queries)
    assert got is not None and saved is not None
    assert np.max(np.abs(got - saved)) <= 100.0 * reference.rank_error


# -- drift -------------------------------------------------------------------------------------------
SEEDS = 60
LENGTH = 4000


def _stream(seed: int, shift: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.normal(-50.0, 2.0, size=LENGTH)
    values[LENGTH // 2 :] += shift
    return values


@pytest.mark.parametrize("name", ["adwin", "page_hinkley"])
def test_drift_detector_fires_on_a_fall_and_not_on_a_stationary_stream(name):
    """Each seed is one trial: a fall of 2 standard deviations halfway, or no change at all."""
    kwargs = {"adwin_delta": 0.002, "page_hinkley_delta": 1.0, "page_hinkley_threshold": 50.0}
    fired, delays, false_alarms = 0, [], 0
    for seed in range(SEEDS):
        detector = DriftDetector(name, **kwargs)
        found = [p for p in detector.update(_stream(seed, -4.0)) if p >= LENGTH // 2]
        fired += bool(found)
        delays += [found[0] - LENGTH // 2] if found else []
        stationary = DriftDetector(name, **kwargs)
        false_alarms += bool(stationary.update(_stream(1000 + seed, 0.0)))
    low, _ = wilson(fired, SEEDS)
    _, high = wilson(false_alarms, SEEDS)
    assert low > 0.8, f"{name} found {fired}/{SEEDS} shifts"
    assert high < 0.2, f"{name} fired on {false_alarms}/{SEEDS} stationary streams"
    assert np.median(delays) < 500


def test_a_rise_of_the_scores_is_learning_not_drift():
    """ADWIN sees any change; a change to higher ELBOs (the model improving) is not reported."""
    rises = 0
    for seed in range(10):
        detector = DriftDetector("adwin", adwin_delta=0.002)
        rises += len(detector.update(_stream(seed, +4.0)))
        assert detector.update(_stream(seed + 50, -4.0))  # the same detector still reports falls
    assert rises == 0


def test_no_detection_during_the_warm_up():
    detector = DriftDetector("adwin", warmup_records=LENGTH)
    assert detector.update(_stream(3, -4.0)) == [] and detector.seen == LENGTH


def test_detector_state_round_trips_and_continues_identically():
    first = DriftDetector("adwin")
    first.update(_stream(5, 0.0))
    second = DriftDetector("adwin")
    second.load(first.state())
    tail = _stream(6, -4.0)
    assert first.update(tail) == second.update(tail) != []
    assert first.detections == second.detections and first.seen == second.seen


# -- the monitor ---------------------------------------------------------------------------------------
def settings(**overrides: object) -> AnomalySettings:
    base: dict[str, object] = {"min_reference_records": 20, "window_records": 200, "drift_warmup_records": 0}
    return AnomalySettings(**{**base, **overrides})


def test_thresholds_flag_nothing_and_train_everything_until_calibrated():
    monitor = AnomalyMonitor(settings())
    first = monitor.thresholds()
    assert math.isnan(first.flag_below) and first.train_floor == -math.inf
    verdict = monitor.judge(np.full(10, -5.0), first, np.ones(10, bool))
    assert verdict.percentiles is None and not verdict.flagged.any()


def test_flagged_records_are_left_out_of_training_unless_configured():
    rng = np.random.default_rng(2)
    for train_on_flagged in (False, True):
        monitor = AnomalyMonitor(settings(train_on_flagged=train_on_flagged, drift_detector="none"))
        monitor.judge(rng.normal(-50, 1, 100), monitor.thresholds(), np.ones(100, bool))
        thresholds = monitor.thresholds()
        assert thresholds.flag_below == pytest.approx(np.quantile(rng.normal(-50, 1, 100_000), 0.01), abs=0.6)
        assert thresholds.train_floor == (-math.inf if train_on_flagged else thresholds.flag_below)
        bound = np.array([-49.0, -60.0, -51.0])
        verdict = monitor.judge(bound, thresholds, np.zeros(3, bool))
        assert verdict.flagged.tolist() == [False, True, False]
        assert verdict.percentiles is not None and verdict.percentiles[1] == 100.0


def test_flags_use_the_thresholds_the_batch_was_submitted_with():
    monitor = AnomalyMonitor(settings(drift_detector="none"))
    submitted = Thresholds(flag_below=-10.0, train_floor=-10.0)
    verdict = monitor.judge(np.array([-11.0, -9.0, np.nan]), submitted, np.zeros(3, bool))
    assert verdict.flagged.tolist() == [True, False, False]


def test_after_a_drift_flagged_records_are_trained_on_for_a_while_and_the_reference_restarts():
    rng = np.random.default_rng(3)
    monitor = AnomalyMonitor(settings(adapt_records_after_drift=300))
    monitor.judge(rng.normal(-50, 1, 2000), monitor.thresholds(), np.ones(2000, bool))
    before = monitor.thresholds()
    assert math.isfinite(before.flag_below) and before.train_floor == before.flag_below
    verdict = monitor.judge(rng.normal(-60, 1, 2000), before, np.ones(2000, bool))
    assert verdict.drift and monitor.adapting
    # the reference holds only scores from after the detection: the new stream's
    assert verdict.threshold_elbo < -60 + 1.0
    assert monitor.thresholds().train_floor == -math.inf  # adapting: flagged records are trained on
    monitor.note_trained(299)
    assert monitor.thresholds().train_floor == -math.inf
    monitor.note_trained(1)
    assert not monitor.adapting and monitor.thresholds().train_floor == monitor.thresholds().flag_below


def test_an_encoder_replicas_monitor_never_changes_its_reference():
    monitor = AnomalyMonitor(settings(), learns=False)
    monitor.judge(np.full(100, -5.0), monitor.thresholds(), np.ones(100, bool))
    assert monitor.reference.records == 0


def test_monitor_state_round_trips():
    rng = np.random.default_rng(4)
    config = settings(drift_response="raise_learning_rate", learning_rate_steps=7)
    monitor = AnomalyMonitor(config)
    monitor.judge(rng.normal(-50, 1, 1500), monitor.thresholds(), np.ones(1500, bool))
    monitor.adapt_left, monitor.response.steps_left = 123, 4  # type: ignore[attr-defined]
    monitor.note_drift(1234.5, 77)
    restored = AnomalyMonitor(config)
    restored.load(monitor.state())
    assert restored.state() == monitor.state()
    # the 1% quantile of N(-50, 1) within the sketch's rank error of 1.3%: +-0.5 nats at most
    assert restored.thresholds().flag_below == pytest.approx(monitor.thresholds().flag_below, abs=0.5)
    assert (restored.adapt_left, restored.last_drift_time, restored.last_drift_step) == (123, 1234.5, 77)
    assert restored.response.state() == monitor.response.state()
    tail = rng.normal(-58, 1, 1500)
    assert monitor.judge(tail, monitor.thresholds(), np.ones(1500, bool)).drift
    assert restored.judge(tail, restored.thresholds(), np.ones(1500, bool)).drift
    assert restored.detector is not None and monitor.detector is not None
    assert restored.detector.detections == monitor.detector.detections


def test_refresh_replaces_the_reference_by_the_current_models_scores():
    monitor = AnomalyMonitor(settings(drift_detector="none"))
    monitor.judge(np.full(500, -100.0), monitor.thresholds(), np.ones(500, bool))  # an old, worse model
    fresh = np.random.default_rng(6).normal(-20.0, 1.0, 300)
    monitor.refresh(fresh)
    assert monitor.reference.records == 300
    assert monitor.thresholds().flag_below == pytest.approx(np.quantile(fresh, 0.01), abs=0.5)
    replica = AnomalyMonitor(settings(), learns=False)
    replica.refresh(fresh)
    assert replica.reference.records == 0


def test_a_batch_scored_before_the_model_is_ready_feeds_nothing_and_gets_no_percentile():
    rng = np.random.default_rng(5)
    monitor = AnomalyMonitor(settings(drift_detector="adwin"))
    monitor.judge(rng.normal(-50, 1, 100), monitor.thresholds(), np.ones(100, bool))
    before, threshold = monitor.reference.state(), monitor.thresholds().flag_below
    detector_before = monitor.detector.state() if monitor.detector is not None else None
    warm_up = np.full(100, -5e5)  # an untrained model's scores: far below any trained one's
    verdict = monitor.judge(warm_up, monitor.thresholds(), np.ones(100, bool), model_ready=False)
    assert verdict.percentiles is None and not verdict.flagged.any() and not verdict.drift
    assert monitor.reference.state() == before and monitor.thresholds().flag_below == threshold
    assert verdict.reference_records == 100 and verdict.threshold_elbo == threshold
    assert (monitor.detector.state() if monitor.detector is not None else None) == detector_before
