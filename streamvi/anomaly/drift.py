"""Drift in the stream of reference scores, found by River's detectors (ADWIN or Page-Hinkley).

A drift is a change of the reference ELBOs *for the worse*: while the model learns, its held-out
scores rise, which ADWIN sees as a change too; such a change is the model improving and is not
reported. Page-Hinkley runs in its ``down`` mode, which looks for falls only. Detection starts after
``warmup_records`` reference scores (the first, fast part of learning is not a drift).
"""

from __future__ import annotations

import pickle
from typing import Any, Literal

from river import drift

DetectorName = Literal["adwin", "page_hinkley"]


class DriftDetector:
    """Feeds reference ELBOs to a River detector, one at a time, and reports falls."""

    def __init__(
        self,
        name: DetectorName,
        *,
        adwin_delta: float = 0.002,
        page_hinkley_delta: float = 1.0,
        page_hinkley_threshold: float = 50.0,
        warmup_records: int = 0,
    ) -> None:
        self.name = name
        self.warmup_records = warmup_records
        self._detector = self._build(name, adwin_delta, page_hinkley_delta, page_hinkley_threshold)
        #: Reference scores seen (the warm-up counts them).
        self.seen = 0
        #: Drifts reported since the model was created.
        self.detections = 0

    @staticmethod
    def _build(name: DetectorName, adwin_delta: float, ph_delta: float, ph_threshold: float) -> Any:
        """ADWIN's ``delta`` is a confidence (scale-free); Page-Hinkley's ``delta`` (the change it
        tolerates) and ``threshold`` are in the scores' unit, nats."""
        if name == "adwin":
            return drift.ADWIN(delta=adwin_delta)
        if name == "page_hinkley":
            return drift.PageHinkley(delta=ph_delta, threshold=ph_threshold, mode="down")
        raise ValueError(f"unknown drift detector {name!r}")

    def update(self, elbo: Any) -> list[int]:
        """Feed scores in order; return the positions (within ``elbo``) where a fall was detected."""
        found: list[int] = []
        for position, value in enumerate(elbo):
            self.seen += 1
            if self.seen <= self.warmup_records:
                continue
            before = self._estimate()
            self._detector.update(float(value))
            if self._detector.drift_detected and self._fell(before):
                self.detections += 1
                found.append(position)
        return found

    def _estimate(self) -> float | None:
        """ADWIN's window mean before an update (None for Page-Hinkley, which needs none)."""
        return float(self._detector.estimation) if self.name == "adwin" else None

    def _fell(self, before: float | None) -> bool:
        """Whether a detected change is a fall: ADWIN drops the older part of its window on a
        change, so its mean then is the recent part's; a fall is a recent mean below the old one."""
        if before is None:
            return True
        return float(self._detector.estimation) < before

    def reset_window(self) -> None:
        """Start the detector afresh (its statistics) but keep the counts."""
        self._detector = self._detector.clone()

    # -- persistence ---------------------------------------------------------------------------------
    def state(self) -> bytes:
        """The detector's whole state (River detectors pickle), for the snapshot."""
        return pickle.dumps({"detector": self._detector, "seen": self.seen, "detections": self.detections})

    def load(self, state: bytes) -> None:
        data = pickle.loads(state)  # written by this process, inside a checksummed snapshot
        self._detector, self.seen, self.detections = data["detector"], data["seen"], data["detections"]
