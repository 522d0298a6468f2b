"""Everything the stream path says: latents, step and held-out metrics, dead letters, Prometheus.

One place turns a finished step into messages and metric updates, so the processor only decides
*when*; a ``NullMetrics`` stands in when no Prometheus registry is configured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from streamvi.anomaly.explain import explanation_json
from streamvi.anomaly.messages import anomaly_messages
from streamvi.anomaly.monitor import Thresholds, Verdict
from streamvi.io.base import OutputSink, RawRecord
from streamvi.io.codecs import (
    DecodeError,
    LatentAnomalyFields,
    dead_letter_message,
    latent_messages,
    metrics_message,
)
from streamvi.metrics import Metrics, StreamMetrics
from streamvi.stream.progress import OutputProgress
from streamvi.stream.state import OutputTopics, StreamState
from streamvi.training.trainer import StepResult, Trainer

log = logging.getLogger(__name__)


class _NoOpMetric:
    """Accepts every prometheus-client metric call and records nothing."""

    def labels(self, *args: Any, **kwargs: Any) -> _NoOpMetric:
        return self

    def inc(self, amount: float = 1.0) -> None:
        return None

    def set(self, value: float) -> None:
        return None

    def observe(self, value: float) -> None:
        return None

    def remove(self, *labelvalues: str) -> None:
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """A metrics helper method (``record_drift_time``) does nothing either."""
        return None


class NullMetrics:
    """A stand-in for :class:`streamvi.metrics.Metrics` whose every metric is a no-op."""

    _metric = _NoOpMetric()

    def __getattr__(self, name: str) -> _NoOpMetric:
        return self._metric


#: What a role's stream path reports to; a trainer's also has the training metrics.
AnyMetrics = StreamMetrics | NullMetrics
TrainerMetrics = Metrics | NullMetrics


def trainer_metrics(metrics: AnyMetrics) -> TrainerMetrics:
    """The training metrics: only a trainer trains, and only a trainer has them."""
    if not isinstance(metrics, Metrics | NullMetrics):
        raise TypeError(f"a step that trains reports to the trainer's Metrics, not {type(metrics).__name__}")
    return metrics


class Publisher:
    """Sends a finished batch's outputs and accounts for them in the counts and the metrics."""

    def __init__(
        self,
        sink: OutputSink,
        topics: OutputTopics,
        trainer: Trainer,
        metrics: AnyMetrics,
        progress: OutputProgress,
        threshold_percentile: float | None = None,
    ) -> None:
        self.sink = sink
        self.topics = topics
        self.trainer = trainer
        self.metrics = metrics
        self.progress = progress
        #: anomaly.threshold_percentile, when anomalies are on.
        self.threshold_percentile = threshold_percentile
        if threshold_percentile is not None:
            metrics.anomaly_threshold_percentile.set(threshold_percentile)

    def dead_letter(self, record: RawRecord, error: DecodeError, state: StreamState) -> None:
        log.debug("dead letter %s:%d@%d: %s", record.topic, record.partition, record.offset, error)
        withheld = self.progress.to_send((record,)) is not None  # a committed transaction sent it
        if withheld:
            self.metrics.outputs_withheld.inc()
        elif self.topics.dead_letter is not None:
            self.sink.send(dead_letter_message(record, self.topics.dead_letter, error))
            self.progress.mark_sent((record,))
        state.counts.dead_letters += 1
        self.metrics.dead_letters.labels(reason=error.reason).inc()

    def batch(
        self,
        records: Sequence[RawRecord],
        record_ids: Sequence[str | None],
        result: StepResult,
        heldout: dict[str, Any] | None,
        state: StreamState,
        snapshot: str | None = None,
        observed: np.ndarray | None = None,
        verdict: Verdict | None = None,
        thresholds: Thresholds | None = None,
    ) -> None:
        """Send a finished batch's latents (when there is a latents topic), its flagged records
        (when there is an anomalies topic) and step metrics (and a held-out evaluation run right
        after its step), and account for its step. ``snapshot`` names the snapshot whose
        parameters scored the batch (an encoder replica's); ``observed`` counts each record's
        observed dimensions under a feature schema; ``verdict`` holds its anomaly figures, from
        the ``thresholds`` it was submitted with."""
        n = len(records)
        scores = result.scores
        estimator = self.trainer.estimator
        send = self.progress.to_send(records)  # None: every record's outputs are sent
        model_step = result.step - 1 if result.trained else result.step  # the parameters that scored it
        explanations = self._explanations(result)
        fields = (
            None
            if verdict is None
            else LatentAnomalyFields(verdict.percentiles, verdict.flagged, explanations)
        )
        if self.topics.latents is not None:
            messages = latent_messages(
                self.topics.latents,
                records,
                record_ids,
                scores.z_loc,
                scores.z_scale,
                scores.bound,
                model_step,
                estimator.bound_name,
                snapshot,
                observed,
                fields,
            )
            if send is not None:
                messages = [message for message, sent in zip(messages, send.tolist(), strict=True) if sent]
            self.sink.send_many(messages)
            self.progress.mark_sent(records)
            # counted as published either way: a committed transaction published the others
            state.counts.latents_published += n
            self.metrics.latents_published.inc(len(messages))
            if send is not None:
                self.metrics.outputs_withheld.inc(n - len(messages))
        if verdict is not None:
            self._anomalies(
                records,
                record_ids,
                result,
                verdict,
                thresholds,
                model_step,
                snapshot,
                explanations,
                state,
                send,
            )
        if not result.trained:
            return
        counts = state.counts
        counts.steps += 1
        counts.flagged_not_trained += result.excluded_records
        if result.applied:
            counts.records_trained += result.trained_records
        else:
            counts.updates_skipped += 1
            counts.records_skipped += n
            log.warning("step %d: non-finite loss or gradient, update skipped", result.step)
        summary = result.summary()
        state.loop.last_summary = summary
        state.history.add(result.step, summary)
        self.sink.send(metrics_message(self.topics.metrics, self._step_payload(result, summary, state)))
        self._record_step_metrics(result, summary)
        if heldout is not None:
            self.heldout(heldout, state)

    def _explanations(self, result: StepResult) -> list[bytes] | None:
        scores = result.scores
        if scores.explain_index is None or scores.explain_value is None:
            return None
        return explanation_json(scores.explain_index, scores.explain_value, self.trainer.explain_names)

    def _anomalies(
        self,
        records: Sequence[RawRecord],
        record_ids: Sequence[str | None],
        result: StepResult,
        verdict: Verdict,
        thresholds: Thresholds | None,
        model_step: int,
        snapshot: str | None,
        explanations: Sequence[bytes] | None,
        state: StreamState,
        send: np.ndarray | None = None,
    ) -> None:
        """Publish the flagged records (those of them whose outputs are sent) and count them all;
        export the reference's figures."""
        flagged = int(np.count_nonzero(verdict.flagged))
        to_publish = (
            verdict
            if send is None
            else replace(verdict, flagged=verdict.flagged & send[: len(verdict.flagged)])
        )
        if np.any(to_publish.flagged) and self.topics.anomalies is not None:
            self.sink.send_many(
                anomaly_messages(
                    self.topics.anomalies,
                    records,
                    record_ids,
                    result.scores.bound,
                    to_publish,
                    model_step=model_step,
                    bound_name=self.trainer.estimator.bound_name,
                    threshold_percentile=self.threshold_percentile or 0.0,
                    threshold_elbo=thresholds.flag_below if thresholds is not None else float("nan"),
                    snapshot=snapshot,
                    explanations=explanations,
                )
            )
        state.counts.anomalies_flagged += flagged
        self.metrics.anomalies_flagged.inc(flagged)
        self.metrics.anomaly_threshold_elbo.set(verdict.threshold_elbo)
        self.metrics.anomaly_reference_records.set(verdict.reference_records)

    def heldout(self, payload: dict[str, Any], state: StreamState) -> None:
        state.loop.last_heldout = payload
        self.sink.send(metrics_message(self.topics.metrics, payload))
        metrics = trainer_metrics(self.metrics)
        metrics.heldout_elbo.set(payload["elbo"])
        metrics.heldout_log_likelihood.set(payload["log_likelihood"])
        metrics.heldout_records.set(payload["records"])

    def _step_payload(
        self, result: StepResult, summary: dict[str, float], state: StreamState
    ) -> dict[str, Any]:
        return {
            "kind": "step",
            "step": result.step,
            "records": result.scores.size,
            "trained_records": result.trained_records,
            "estimator": self.trainer.estimator.name,
            "bound": self.trainer.estimator.bound_name,
            **summary,
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "learning_rate": result.learning_rate,
            "step_seconds": result.duration_seconds,
            "update_skipped": not result.applied,
            "clipped": result.clipped,
            "rehearsal_updates": result.rehearsal_updates,
            "model_ready": result.model_ready,
            "wall_time": time.time(),
            "records_trained": state.counts.records_trained,
        }

    def _record_step_metrics(self, result: StepResult, summary: dict[str, float]) -> None:
        m = trainer_metrics(self.metrics)
        if result.excluded_records:
            m.flagged_not_trained.inc(result.excluded_records)
        if result.applied:
            m.records_trained.inc(result.trained_records)
        else:
            m.nonfinite_updates.inc()
        m.train_steps.inc()
        m.model_step.set(result.step)
        m.elbo.set(summary["elbo"])
        m.kl.set(summary["kl"])
        m.reconstruction.set(summary["reconstruction"])
        m.gradient_norm.set(result.grad_norm)
        if result.clipped:
            m.gradient_clipped.inc()
        if result.rehearsal_updates:
            m.rehearsal_updates.inc(result.rehearsal_updates)
        m.learning_rate.set(result.learning_rate)
        m.step_duration.observe(result.duration_seconds)
        m.batch_size.observe(result.scores.size)


def heldout_payload(
    trainer: Trainer,
    importance_samples: int,
    step: int,
    x: np.ndarray,
    c: np.ndarray,
    scored: Callable[[np.ndarray], None] | None = None,
) -> dict[str, Any] | None:
    """Held-out ELBO and importance-weighted log-likelihood (IWAE-k) on the reservoir's rows, with
    no update; None when the reservoir is still empty. ``scored`` receives each row's ELBO."""
    if x.shape[0] == 0:
        return None
    bound = trainer.evaluate(x, c).bound
    if scored is not None:
        scored(bound)
    return {
        "kind": "heldout",
        "step": step,
        "records": int(x.shape[0]),
        "bound": trainer.estimator.bound_name,
        "elbo": float(np.mean(bound)),
        "log_likelihood": float(np.mean(trainer.log_likelihood(x, c, importance_samples))),
        "importance_samples": importance_samples,
        "wall_time": time.time(),
    }
