"""Turns a batch's prequential ELBOs into decisions: percentiles, flags, drift and what trains.

The loop asks for :class:`Thresholds` as it submits a batch, so the step leaves flagged records out
of its update on the device (``Trainer.set_training_floor``) by exactly the rule that flags them:
a record is flagged when its ELBO is below the threshold ELBO in force when its batch was
submitted. After the step, :meth:`AnomalyMonitor.judge` reads the percentiles against that same
reference (frozen with the thresholds, so a record is flagged exactly when its percentile passes
the threshold, up to the sketch's ties), then feeds the batch's reference scores (records never
trained on) to the sketch and the drift detector, and reports a drift.

Every reference score enters the sketch, flagged or not: leaving the flagged ones out would cut the
reference's lower tail, move the threshold up, flag more, and spiral. The price is that anomalies
in the reference itself raise the threshold: ``threshold_percentile`` must leave room for the
share of anomalies expected (at 99, a stream of more than 1% anomalies flags only part of them).

After a drift the reference restarts and, for ``adapt_records_after_drift`` trained records,
flagged records are trained on.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamvi.anomaly.calibration import FrozenReference, ScoreReference
from streamvi.anomaly.drift import DriftDetector
from streamvi.anomaly.responses import DriftResponse, build_response
from streamvi.config import AnomalySettings

#: The monitor's state inside a snapshot (covered by the snapshot's checksums).
STATE_FILE = "anomaly.json"
_STATE_VERSION = 1


@dataclass(frozen=True)
class Thresholds:
    """What a batch is submitted with: flag below ``flag_below`` (NaN: flag nothing yet) and train
    only on rows at or above ``train_floor`` (-inf: every trainable row)."""

    flag_below: float
    train_floor: float
    #: The reference these thresholds come from: the batch's percentiles are read against it too.
    reference: FrozenReference | None = field(default=None, compare=False)

    @classmethod
    def none(cls) -> Thresholds:
        return cls(math.nan, -math.inf)


@dataclass(frozen=True)
class Verdict:
    """A finished batch's anomaly figures, per real record."""

    #: Share (%) of reference scores above each record's ELBO; None while not calibrated.
    percentiles: np.ndarray | None
    flagged: np.ndarray
    #: Reference scores the percentiles rest on, and the threshold ELBO after this batch.
    reference_records: int
    threshold_elbo: float
    #: A drift was detected among this batch's reference scores.
    drift: bool = False


class AnomalyMonitor:
    """The calibrated reference, the drift detector and the adaptation after a drift."""

    def __init__(self, settings: AnomalySettings, *, learns: bool = True) -> None:
        self.settings = settings
        #: False for an encoder replica: it reads the snapshot's reference and never changes it.
        self.learns = learns
        self.reference = ScoreReference(
            settings.window_records, settings.min_reference_records, settings.sketch_k
        )
        self.detector = (
            None
            if settings.drift_detector == "none"
            else DriftDetector(
                settings.drift_detector,
                adwin_delta=settings.adwin_delta,
                page_hinkley_delta=settings.page_hinkley_delta,
                page_hinkley_threshold=settings.page_hinkley_threshold,
                warmup_records=settings.drift_warmup_records,
            )
        )
        #: What a drift does to training (the trainer role carries it out on the step thread).
        self.response: DriftResponse = build_response(settings)
        #: Trained records left before flagged records stop being trained on again.
        self.adapt_left = 0
        #: Unix time and model step of the last drift (0: none since the model was created).
        self.last_drift_time = 0.0
        self.last_drift_step = 0

    @property
    def adapting(self) -> bool:
        """Adapting to a drift: flagged records are trained on, or the response is still active."""
        return self.adapt_left > 0 or self.response.active

    @property
    def training_flagged(self) -> bool:
        return self.settings.train_on_flagged or self.adapt_left > 0

    def thresholds(self) -> Thresholds:
        """The thresholds a batch submitted now is scored and trained with."""
        frozen = self.reference.frozen()
        flag_below = frozen.threshold_elbo(self.settings.threshold_percentile)
        excluded = not self.training_flagged and math.isfinite(flag_below)
        return Thresholds(flag_below, flag_below if excluded else -math.inf, frozen)

    def judge(
        self,
        bound: np.ndarray,
        thresholds: Thresholds,
        reference_rows: np.ndarray,
        model_ready: bool = True,
    ) -> Verdict:
        """Percentiles and flags of a finished batch, then its reference scores (``bound`` where
        ``reference_rows``) fed to the sketch and the detector, in stream order.

        A batch scored by a model that was not ready (its normaliser warming up, its parameters
        never updated) gets no percentile and no flag, and its scores feed nothing: they are far
        below what the model scores once it learns, so in the reference they would hold its lower
        tail, and the threshold under it, for as long as they stay there (a window's worth of
        reference scores, ten times as many records at a held-out share of 0.1).
        """
        if not model_ready:
            return Verdict(
                None,
                np.zeros(np.shape(bound), dtype=bool),
                self.reference.records,
                self.reference.threshold_elbo(self.settings.threshold_percentile),
            )
        source = thresholds.reference if thresholds.reference is not None else self.reference
        percentiles = source.percentiles(bound)
        with np.errstate(invalid="ignore"):
            flagged = np.asarray(bound < thresholds.flag_below) & np.isfinite(bound)
        drift = False
        if self.learns:
            scores = np.asarray(bound, dtype=np.float64)[reference_rows]
            found = self.detector.update(scores) if self.detector is not None else []
            if found:
                drift = True
                self.reference.reset()  # the old scores describe the stream before the drift
                scores = scores[found[-1] :]
                self.adapt_left = self.settings.adapt_records_after_drift
            self.reference.update(scores)
        return Verdict(
            percentiles,
            flagged,
            self.reference.records,
            self.reference.threshold_elbo(self.settings.threshold_percentile),
            drift,
        )

    def refresh(self, elbo: np.ndarray) -> None:
        """Replace the reference by the current parameters' scores of the newest held-out records
        (the held-out evaluation's): a model that learns makes old scores too low a reference."""
        if self.learns:
            self.reference.reset()
            self.reference.update(elbo)

    def follow_drift(self) -> None:
        """Another trainer worker's detector found a drift: restart this one's reference and
        detector and adapt as if it had found it, so every worker answers the drift once."""
        if self.learns:
            self.reference.reset()
            if self.detector is not None:
                self.detector.restart()
            self.adapt_left = self.settings.adapt_records_after_drift

    def note_trained(self, records: int) -> None:
        """Count trained records against the adaptation after a drift."""
        self.adapt_left = max(0, self.adapt_left - records)

    def note_drift(self, when: float, step: int) -> None:
        self.last_drift_time, self.last_drift_step = when, step

    # -- persistence ---------------------------------------------------------------------------------
    def state(self) -> bytes:
        """Everything a restart needs to go on as if it had not stopped (JSON, no pickle: the
        sketches in DataSketches' own serialised form and the detector's scores, base64)."""
        reference = {
            key: None if value is None else base64.b64encode(value).decode("ascii")
            for key, value in self.reference.state().items()
        }
        data: dict[str, Any] = {
            "version": _STATE_VERSION,
            "reference": reference,
            "detector": None if self.detector is None else self.detector.state(),
            "adapt_left": self.adapt_left,
            "response": {"name": self.response.name, **self.response.state()},
            "last_drift_time": self.last_drift_time,
            "last_drift_step": self.last_drift_step,
        }
        return json.dumps(data, sort_keys=True).encode("utf-8")

    def load(self, content: bytes) -> None:
        """Restore :meth:`state`; a detector saved under another ``drift_detector`` starts afresh."""
        data = json.loads(content)
        if data.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown anomaly state version {data.get('version')!r}")
        saved_reference = data["reference"]
        self.reference.load(
            {
                key: None if value is None else base64.b64decode(value)
                for key, value in saved_reference.items()
            }
        )
        saved = data.get("detector")
        if self.detector is not None and saved is not None and saved["name"] == self.detector.name:
            self.detector.load(saved)
        response = data.get("response") or {}
        if response.get("name") == self.response.name:
            self.response.load(response)
        self.adapt_left = int(data.get("adapt_left", 0))
        self.last_drift_time = float(data.get("last_drift_time", 0.0))
        self.last_drift_step = int(data.get("last_drift_step", 0))
