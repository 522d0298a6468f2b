"""Calibrated anomaly scores: a record's ELBO as a percentile of recent reference scores.

The reference is a pair of Apache DataSketches KLL sketches over the most recent reference scores
(the held-out share's ELBOs, each computed before any update saw it): the current window fills
until it holds ``window_records`` scores, then it becomes the previous window and a new one starts.
Percentiles are taken against both together, so they always rest on between one and two windows of
scores and follow a stream whose scores change. KLL's rank error is stated by the library
(``normalized_rank_error``: about 1.3% at k=200, with 99% confidence), and a sketch serialises to a
few kilobytes, which the snapshot keeps.

KLL compacts at random (its error bound is probabilistic), so two sketches of the same scores may
answer a query slightly differently, within that bound: a restored reference gives the same
percentiles as the one saved up to the rank error, not bit for bit.

A record's *anomaly percentile* is the share (in percent) of reference scores that are higher than
its ELBO: 99.5 means only 0.5% of recent held-out records scored worse. A record is flagged when its
percentile passes ``threshold_percentile``; equivalently, when its ELBO is below the reference's
``(100 - threshold_percentile)``-th percentile, the *threshold ELBO*.
"""

from __future__ import annotations

import math

import numpy as np
from datasketches import kll_floats_sketch


class FrozenReference:
    """A reference as it was at one moment (a copy of its merged sketch): the percentiles and the
    threshold of a batch come from the same state, whatever the reference learns meanwhile."""

    def __init__(self, sketch: kll_floats_sketch | None) -> None:
        self._sketch = sketch

    def percentiles(self, elbo: np.ndarray) -> np.ndarray | None:
        """As :meth:`ScoreReference.percentiles`, against this state (None: it was not calibrated)."""
        return None if self._sketch is None else _percentiles(self._sketch, elbo)

    def threshold_elbo(self, threshold_percentile: float) -> float:
        if self._sketch is None:
            return math.nan
        return float(self._sketch.get_quantile(1.0 - threshold_percentile / 100.0))


def _percentiles(sketch: kll_floats_sketch, elbo: np.ndarray) -> np.ndarray:
    values = np.asarray(elbo, dtype=np.float64)
    out = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    if not finite.any():
        return out
    # the sketch holds float32 values: split points must be unique as float32
    points, inverse = np.unique(values[finite].astype(np.float32), return_inverse=True)
    # get_cdf(points)[i] is the fraction of reference scores below points[i] (exclusive)
    below = np.asarray(sketch.get_cdf(points.tolist()), dtype=np.float64)
    out[finite] = 100.0 * (1.0 - below[:-1][inverse])
    return out


class ScoreReference:
    """Two rotating KLL sketches of recent reference ELBOs, and percentiles against them."""

    def __init__(self, window_records: int, min_records: int, k: int = 200) -> None:
        if window_records < 1 or min_records < 1:
            raise ValueError("window_records and min_records must be positive")
        self.window_records = window_records
        self.min_records = min_records
        self.k = k
        self._current = kll_floats_sketch(k)
        self._previous: kll_floats_sketch | None = None
        #: Both windows merged, kept until the next update: KLL compacts at random, so merging
        #: anew for every query could give two answers for one reference.
        self._both: kll_floats_sketch | None = None
        self._frozen: FrozenReference | None = None

    # -- reading -------------------------------------------------------------------------------------
    @property
    def records(self) -> int:
        """Reference scores the percentiles rest on (both windows)."""
        return int(self._current.n) + (int(self._previous.n) if self._previous is not None else 0)

    @property
    def calibrated(self) -> bool:
        """Whether there are enough reference scores (``min_records``) for a percentile."""
        return self.records >= self.min_records

    @property
    def rank_error(self) -> float:
        """The sketch's stated normalised rank error (99% confidence), as a fraction."""
        return float(kll_floats_sketch.get_normalized_rank_error(self.k, False))

    def _merged(self) -> kll_floats_sketch:
        if self._previous is None:
            return self._current
        if self._both is None:
            self._both = kll_floats_sketch(self.k)
            self._both.merge(self._previous)
            self._both.merge(self._current)
        return self._both

    def percentiles(self, elbo: np.ndarray) -> np.ndarray | None:
        """Each ELBO's anomaly percentile (share of reference scores above it, in percent), or None
        while not calibrated. Non-finite ELBOs get NaN."""
        return self.frozen().percentiles(elbo)

    def threshold_elbo(self, threshold_percentile: float) -> float:
        """The ELBO below which a record's percentile passes ``threshold_percentile`` (NaN while not
        calibrated): the reference's ``(100 - threshold_percentile)``-th percentile."""
        return self.frozen().threshold_elbo(threshold_percentile)

    def frozen(self) -> FrozenReference:
        """The reference as it is now, unaffected by later updates (one copy per update)."""
        if self._frozen is None:
            if not self.calibrated:
                self._frozen = FrozenReference(None)
            else:
                merged = self._merged()
                # a copy: the current window's sketch goes on filling
                self._frozen = FrozenReference(kll_floats_sketch.deserialize(merged.serialize()))
        return self._frozen

    # -- learning ------------------------------------------------------------------------------------
    def update(self, elbo: np.ndarray) -> None:
        """Add reference scores (non-finite ones are left out), rotating windows as they fill."""
        values = np.asarray(elbo, dtype=np.float32)
        values = values[np.isfinite(values)]
        if values.size:
            self._both = self._frozen = None
        while values.size:
            room = self.window_records - int(self._current.n)
            part, values = values[:room], values[room:]
            self._current.update(part)
            if int(self._current.n) >= self.window_records:
                self._previous, self._current = self._current, kll_floats_sketch(self.k)

    def reset(self) -> None:
        """Forget every reference score (after a drift: the old scores describe another stream)."""
        self._current = kll_floats_sketch(self.k)
        self._previous = self._both = self._frozen = None

    # -- persistence ---------------------------------------------------------------------------------
    def state(self) -> dict[str, bytes | None]:
        """The sketches serialised by DataSketches (the snapshot keeps them)."""
        return {
            "current": self._current.serialize(),
            "previous": self._previous.serialize() if self._previous is not None else None,
        }

    def load(self, state: dict[str, bytes | None]) -> None:
        current, previous = state.get("current"), state.get("previous")
        self._current = kll_floats_sketch.deserialize(current) if current else kll_floats_sketch(self.k)
        self._previous = kll_floats_sketch.deserialize(previous) if previous else None
        self._both = self._frozen = None
