"""Drift in the stream of reference scores, found by River's detectors (ADWIN or Page-Hinkley).

A drift is a change of the reference ELBOs *for the worse*: while the model learns, its held-out
scores rise, which ADWIN sees as a change too; such a change is the model improving and is not
reported. Page-Hinkley runs in its ``down`` mode, which looks for falls only. Detection starts after
``warmup_records`` reference scores (the first, fast part of learning is not a drift). After a
reported drift the detector starts afresh on the new stream.

The detector's state is saved without pickle, as the scores it has seen since it (re)started (at
most ``REPLAY_RECORDS``, the newest): restoring feeds them to a fresh detector, which rebuilds the
very state the saved one had when they are all there (River's detectors are deterministic).
"""

from __future__ import annotations

import base64
import collections
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
from river import drift

DetectorName = Literal["adwin", "page_hinkley"]

#: Scores since the detector (re)started that its saved state keeps.
REPLAY_RECORDS = 20_000


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
        self._params = (adwin_delta, page_hinkley_delta, page_hinkley_threshold)
        self._detector = self._build()
        self._replay: collections.deque[float] = collections.deque(maxlen=REPLAY_RECORDS)
        #: Reference scores seen (the warm-up counts them).
        self.seen = 0
        #: Drifts reported since the model was created.
        self.detections = 0

    def _build(self) -> Any:
        """ADWIN's ``delta`` is a confidence (scale-free); Page-Hinkley's ``delta`` (the change it
        tolerates) and ``threshold`` are in the scores' unit, nats."""
        adwin_delta, ph_delta, ph_threshold = self._params
        if self.name == "adwin":
            return drift.ADWIN(delta=adwin_delta)
        if self.name == "page_hinkley":
            return drift.PageHinkley(delta=ph_delta, threshold=ph_threshold, mode="down")
        raise ValueError(f"unknown drift detector {self.name!r}")

    def update(self, elbo: Iterable[float]) -> list[int]:
        """Feed scores in order; return the positions (within ``elbo``) where a fall was detected."""
        found: list[int] = []
        # float32, as the snapshot keeps them: a restored detector sees exactly the same values
        for position, value in enumerate(np.asarray(list(elbo), dtype=np.float32).tolist()):
            self.seen += 1
            if self.seen <= self.warmup_records:
                continue
            if self._feed(value):
                self.detections += 1
                found.append(position)
                self.restart()
        return found

    def restart(self) -> None:
        """Start the detector afresh (after a drift: its window describes the stream before it)."""
        self._detector, self._replay = self._build(), collections.deque(maxlen=REPLAY_RECORDS)

    def _feed(self, value: float) -> bool:
        """One score into the detector; True when it detected a fall. ADWIN drops the older part of
        its window on a change, so its mean then is the recent part's: a fall is a recent mean
        below the whole window's mean before the update."""
        before = float(self._detector.estimation) if self.name == "adwin" else None
        self._detector.update(value)
        self._replay.append(value)
        if not self._detector.drift_detected:
            return False
        return before is None or float(self._detector.estimation) < before

    # -- persistence ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-able state: the counts and the scores since the detector (re)started."""
        replay = np.asarray(self._replay, dtype=np.float32).tobytes()
        return {
            "name": self.name,
            "seen": self.seen,
            "detections": self.detections,
            "replay": base64.b64encode(replay).decode("ascii"),
        }

    def load(self, state: dict[str, Any]) -> None:
        """Rebuild the detector from :meth:`state` by feeding its scores to a fresh one."""
        values = np.frombuffer(base64.b64decode(state["replay"]), dtype=np.float32)
        self._detector, self._replay = self._build(), collections.deque(maxlen=REPLAY_RECORDS)
        for value in values.tolist():
            self._feed(value)
        self.seen, self.detections = int(state["seen"]), int(state["detections"])
