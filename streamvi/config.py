"""One frozen, typed configuration: YAML file, then STREAMVI_* environment, then --set overrides.

Precedence, lowest to highest: field defaults < YAML file < environment (``STREAMVI_`` prefix,
nested with ``__``, e.g. ``STREAMVI_TRAINING__BATCH_SIZE=64``) < ``--set section.key=value``.
Unknown keys and bad values raise :class:`ConfigError` naming the offending setting, and so does
a setting given (in the file, the environment or ``--set``) that cannot apply under the variant
chosen by another, e.g. ``model.categories`` with ``model.latent=gaussian``: see
:class:`AppliesWhen` and each section's ``applies_when``. Left at its default, such a setting is
fine, and :meth:`Settings.public_dict` leaves it out.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from streamvi.errors import ConfigError, StreamVIError
from streamvi.features.schema import FeatureSpec, check_input_settings, read_features

ENV_PREFIX = "STREAMVI_"
ENV_NESTED_DELIMITER = "__"


@dataclass(frozen=True)
class AppliesWhen:
    """A setting applies only while another setting of the same section has one of ``values``."""

    setting: str
    values: tuple[Any, ...]

    def holds(self, value: Any) -> bool:
        return value in self.values

    def needed(self, name: str) -> str:
        """The condition in words, for ``name`` (the dotted name of ``setting``)."""
        return f"{name}=" + " or ".join(_shown(v) for v in self.values)

    def fix(self, name: str) -> str:
        """A setting that makes the condition hold."""
        return f"{name}={_shown(self.values[0])}"


@dataclass(frozen=True)
class AppliesWhenGiven(AppliesWhen):
    """A setting applies only while another setting is given (not null)."""

    values: tuple[Any, ...] = ()

    def holds(self, value: Any) -> bool:
        return value is not None

    def needed(self, name: str) -> str:
        return f"{name} given"

    def fix(self, name: str) -> str:
        return f"{name} (give it)"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Settings of this section that apply only under some values of others, each with every
    #: condition it needs. Given explicitly where a condition fails, a setting is rejected at load.
    applies_when: ClassVar[Mapping[str, tuple[AppliesWhen, ...]]] = {}


class KafkaSettings(_Section):
    """Broker address, topics, consumer group and client pass-through settings (security included).

    Each client library's names for them are next to its adapter: :mod:`streamvi.io.kafka_options`
    (kafka-python) and :mod:`streamvi.io.rdkafka_options` (librdkafka); what librdkafka cannot do is
    refused here, at load.
    """

    # NoDecode: the environment may give "host1:9092,host2:9092" rather than a JSON list.
    bootstrap_servers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["localhost:9092"], min_length=1
    )
    #: The Kafka client library behind the daemon's consumer and producers. ``kafka-python`` is pure
    #: Python; ``librdkafka`` (confluent-kafka) encodes, decodes and prefetches records in C threads
    #: at about a sixth of the CPU per record. Both honour every setting below and the same delivery
    #: guarantees; librdkafka has no Kerberos (``sasl_mechanism: GSSAPI``) and needs
    #: ``max_poll_interval_ms >= session_timeout_ms``.
    client: Literal["kafka-python", "librdkafka"] = "kafka-python"
    input_topic: str = Field("streamvi.input", min_length=1)
    latents_topic: str = Field("streamvi.latents", min_length=1)
    metrics_topic: str = Field("streamvi.metrics", min_length=1)
    dead_letter_topic: str = Field("streamvi.dead-letter", min_length=1)
    #: Records flagged as anomalies (anomaly.threshold_percentile), one message each.
    anomalies_topic: str = Field("streamvi.anomalies", min_length=1)
    group_id: str = Field("streamvi", min_length=1)
    client_id: str = Field("streamvi", min_length=1)
    create_topics: bool = True
    topic_partitions: int = Field(1, ge=1)
    topic_replication_factor: int = Field(1, ge=1)
    session_timeout_ms: int = Field(10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(3_000, ge=100)
    max_poll_interval_ms: int = Field(300_000, ge=1_000)
    max_poll_records: int = Field(1_000, ge=1)
    fetch_max_bytes: int = Field(52_428_800, ge=1_024)
    #: Per-partition bytes per fetch (kafka-python's default of 1 MiB holds only ~300 MNIST-sized records).
    max_partition_fetch_bytes: int = Field(8_388_608, ge=1_024)
    #: How long the broker may hold a fetch waiting for data; bounds input latency on brokers that do
    #: not answer a waiting fetch as soon as data arrives.
    fetch_max_wait_ms: int = Field(20, ge=0, le=10_000)
    request_timeout_ms: int = Field(30_000, ge=1_000)
    producer_linger_ms: int = Field(5, ge=0)
    producer_batch_bytes: int = Field(262_144, ge=1_024)
    producer_compression: Literal["none", "gzip"] = "none"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = None
    ssl_check_hostname: bool = True

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split_servers(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return yaml.safe_load(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError("kafka.sasl_mechanism is required when kafka.security_protocol is SASL_*")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
            self.sasl_username is None or self.sasl_password is None
        ):
            raise ValueError("kafka.sasl_username and kafka.sasl_password are required for that mechanism")
        topics = [
            self.input_topic,
            self.latents_topic,
            self.metrics_topic,
            self.dead_letter_topic,
            self.anomalies_topic,
        ]
        if len(set(topics)) != len(topics):
            raise ValueError(
                "kafka input, latents, metrics, dead-letter and anomalies topics must all differ"
            )
        if self.client == "librdkafka":
            self._check_librdkafka()
        return self

    def _check_librdkafka(self) -> None:
        """Combinations librdkafka refuses (or cannot do) are refused here, at load, by setting name."""
        if self.sasl_mechanism == "GSSAPI":
            raise ValueError(
                "kafka.sasl_mechanism=GSSAPI needs kafka.client=kafka-python: the librdkafka in the "
                "confluent-kafka wheel is built without Kerberos"
            )
        if self.max_poll_interval_ms < self.session_timeout_ms:
            raise ValueError(
                "kafka.max_poll_interval_ms must be at least kafka.session_timeout_ms "
                "with kafka.client=librdkafka"
            )

    def failure(self, exc: BaseException) -> StreamVIError:
        """A Kafka client error (kafka-python's or librdkafka's) as a message naming the settings to check."""
        return StreamVIError(
            f"Kafka at kafka.bootstrap_servers={','.join(self.bootstrap_servers)} "
            f"(kafka.security_protocol={self.security_protocol}) failed: {_client_error_text(exc)}"
        )


def _client_error_text(exc: BaseException) -> str:
    """The message of a Kafka client error: librdkafka's ``KafkaException`` wraps a ``KafkaError``."""
    error: Any = exc.args[0] if len(exc.args) == 1 else None
    if callable(getattr(error, "str", None)) and callable(getattr(error, "name", None)):
        return f"{error.str()} ({error.name()})"
    return str(exc)


_FEATURES_GIVEN = AppliesWhenGiven("features")


class InputSettings(_Section):
    """How input records are encoded and what they must contain.

    Without ``features`` a record is a model-ready vector of ``dim`` values. With a feature schema
    (a list, or the path of a YAML/JSON file holding one; see :mod:`streamvi.features.schema`) a
    record is an event with named fields (``json`` or ``avro``), ``dim`` is the number of features,
    and numeric features are standardised online (``normalise``).
    """

    applies_when: ClassVar[Mapping[str, tuple[AppliesWhen, ...]]] = {
        "normalise": (_FEATURES_GIVEN,),
        "normalise_warmup": (_FEATURES_GIVEN, AppliesWhen("normalise", (True,))),
        "avro_schema": (AppliesWhen("format", ("avro",)),),
        "avro_schema_ids": (AppliesWhen("format", ("avro",)),),
    }

    format: Literal["json", "f32", "avro"] = "json"
    dim: int = Field(64, ge=1)
    context_dim: int = Field(0, ge=0)
    max_record_bytes: int = Field(1_048_576, ge=16)
    features: list[FeatureSpec] | None = None
    #: Standardise numeric features by their running mean and variance over the records trained on.
    normalise: bool = True
    #: Records folded into the normaliser before the model's parameters are first updated.
    normalise_warmup: int = Field(256, ge=1)
    #: Avro without a wire header: the writer schema (.avsc) of every record.
    avro_schema: Path | None = None
    #: Avro in the Confluent wire format (magic byte 0, 4-byte schema id): each id's schema file.
    avro_schema_ids: dict[int, Path] = Field(default_factory=dict)

    @field_validator("features", mode="before")
    @classmethod
    def _read_features(cls, value: Any) -> Any:
        return read_features(value)

    @model_validator(mode="before")
    @classmethod
    def _derive_dim(cls, data: Any) -> Any:
        """With a feature schema, ``dim`` is the number of features."""
        if isinstance(data, Mapping) and data.get("features") is not None and "dim" not in data:
            features = read_features(data["features"])
            if isinstance(features, list):
                return {**data, "features": features, "dim": max(1, len(features))}
        return data

    @model_validator(mode="after")
    def _check_features(self) -> InputSettings:
        if self.features is None:
            if self.format == "avro":
                raise ValueError("input.format=avro needs input.features (the fields to read)")
            return self
        check_input_settings(self)
        return self


_GAUSSIAN_LATENT = AppliesWhen("latent", ("gaussian",))
_GUMBEL_LATENT = AppliesWhen("latent", ("gumbel_softmax",))
_GAUSSIAN_LIKELIHOOD = AppliesWhen("likelihood", ("gaussian",))
_BINOMIAL_LIKELIHOOD = AppliesWhen("likelihood", ("binomial",))


class ModelSettings(_Section):
    """The amortised encoder q(z|x), the decoder p(x|z) and their distributions."""

    applies_when: ClassVar[Mapping[str, tuple[AppliesWhen, ...]]] = {
        "latent_dim": (_GAUSSIAN_LATENT,),
        "min_posterior_scale": (_GAUSSIAN_LATENT,),
        **dict.fromkeys(
            (
                "categorical_variables",
                "categories",
                "temperature_start",
                "temperature_floor",
                "temperature_rate",
                "straight_through",
            ),
            (_GUMBEL_LATENT,),
        ),
        "likelihood": (AppliesWhen("input.features", (None,)),),  # each feature's type chooses it
        "numeric_likelihood": (AppliesWhenGiven("input.features"),),
        "observation_scale": (_GAUSSIAN_LIKELIHOOD,),
        "learn_observation_scale": (_GAUSSIAN_LIKELIHOOD,),
        "min_observation_scale": (_GAUSSIAN_LIKELIHOOD, AppliesWhen("learn_observation_scale", (True,))),
        "binomial_total_count": (_BINOMIAL_LIKELIHOOD,),
    }

    latent: Literal["gaussian", "gumbel_softmax"] = "gaussian"
    latent_dim: int = Field(8, ge=1)
    categorical_variables: int = Field(8, ge=1)
    categories: int = Field(10, ge=2)
    temperature_start: float = Field(1.0, gt=0.0)
    temperature_floor: float = Field(0.5, gt=0.0)
    temperature_rate: float = Field(1e-4, ge=0.0)
    straight_through: bool = False
    encoder_hidden: list[int] = Field(default_factory=lambda: [256, 128])
    decoder_hidden: list[int] | None = None
    activation: Literal["relu", "elu", "gelu", "tanh", "softplus", "swish"] = "relu"
    #: p(x|z): ``bernoulli`` for binary x, ``continuous_bernoulli`` for values in [0, 1] (a true
    #: density there), ``gaussian`` for real values, ``poisson`` for counts, ``binomial`` for counts
    #: out of a known total (``binomial_total_count``).
    likelihood: Literal["bernoulli", "continuous_bernoulli", "gaussian", "poisson", "binomial"] = "bernoulli"
    #: Under a feature schema, the density of each numeric feature's standardised value: a Gaussian,
    #: or a Student-t whose degrees of freedom are learned per feature (heavy tails: a value far
    #: off a nearly constant feature costs tens of nats, not the Gaussian's millions).
    numeric_likelihood: Literal["gaussian", "student_t"] = "gaussian"
    observation_scale: float = Field(0.1, gt=0.0)
    learn_observation_scale: bool = False
    #: Floor of a learned Gaussian observation scale (in the data's units): it bounds each
    #: dimension's log-density by -log(floor) - 0.919 nats, so constant input columns cannot drive
    #: the ELBO to +infinity. The learned scale is floor + exp(log_scale).
    min_observation_scale: float = Field(1e-3, gt=0.0)
    min_posterior_scale: float = Field(1e-4, gt=0.0)
    #: N of the binomial likelihood: every value of x is a count in 0..N (required with it).
    binomial_total_count: int | None = Field(None, ge=1)

    @field_validator("encoder_hidden", "decoder_hidden")
    @classmethod
    def _positive_widths(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(width < 1 for width in value):
            raise ValueError("hidden layer widths must be positive integers")
        return value

    @model_validator(mode="after")
    def _check_temperature(self) -> ModelSettings:
        # only where they apply: elsewhere a given one is rejected as not applying (Settings)
        if self.latent == "gumbel_softmax" and self.temperature_floor > self.temperature_start:
            raise ValueError("model.temperature_floor must not exceed model.temperature_start")
        if (
            self.likelihood == "gaussian"
            and self.learn_observation_scale
            and not self.observation_scale > self.min_observation_scale
        ):
            raise ValueError(
                "model.observation_scale (the learned scale's start) must exceed model.min_observation_scale"
            )
        if self.likelihood == "binomial" and self.binomial_total_count is None:
            raise ValueError(
                "model.likelihood=binomial needs model.binomial_total_count (every value a count in 0..N)"
            )
        return self

    @property
    def decoder_widths(self) -> list[int]:
        """Decoder hidden widths: as configured, or the encoder's mirrored."""
        return list(self.decoder_hidden) if self.decoder_hidden is not None else self.encoder_hidden[::-1]


_SCORE_FUNCTION = AppliesWhen("estimator", ("score_function",))


class TrainingSettings(_Section):
    """The stochastic-gradient VI update and micro-batching."""

    applies_when: ClassVar[Mapping[str, tuple[AppliesWhen, ...]]] = {
        "baseline": (_SCORE_FUNCTION,),
        "baseline_decay": (_SCORE_FUNCTION, AppliesWhen("baseline", ("running_mean", "learned"))),
        "baseline_hidden": (_SCORE_FUNCTION, AppliesWhen("baseline", ("learned",))),
        "rehearsal_steps": (AppliesWhenGiven("rehearsal_window_records"),),
    }

    estimator: Literal["sgvb_a", "sgvb_b", "iwae", "stl", "dreg", "score_function"] = "sgvb_b"
    samples: int = Field(1, ge=1)
    baseline: Literal["none", "running_mean", "learned"] = "running_mean"
    baseline_decay: float = Field(0.99, ge=0.0, lt=1.0)
    baseline_hidden: int = Field(64, ge=1)
    batch_size: int = Field(128, ge=1)
    max_batch_latency_ms: int = Field(250, ge=1)
    #: Micro-batches that may wait for or run in the training step while the next one fills; the
    #: bounded queue between fetching/decoding and training (each holds batch_size x dim float32).
    pipeline_depth: int = Field(3, ge=1, le=64)
    optimizer: Literal["adam", "adamw", "rmsprop", "sgd"] = "adam"
    learning_rate: float = Field(1e-3, gt=0.0)
    clip_grad_norm: float | None = Field(10.0, gt=0.0)
    seed: int = 0
    jit_compile: bool = True
    device: str | None = None
    mixed_precision: Literal["off", "mixed_float16", "mixed_bfloat16"] = "off"
    #: The share of records the trainer trains on, chosen by a hash of the record key (like the
    #: held-out share, and independent of it): one trainer can follow a topic larger than it can
    #: train on. The rest are scored (when latents are published) or only consumed.
    sample_fraction: float = Field(1.0, gt=0.0, le=1.0)
    #: false: the trainer publishes no latents and no dead letters (only metrics and snapshots; bad
    #: records are still counted), for a deployment where encoder replicas (``streamvi serve``),
    #: which see every record, publish both.
    publish_latents: bool = True
    #: Rehearsal (streamvi/training/rehearsal.py): the last N records trained on, kept beside the
    #: model, from which every training step draws ``rehearsal_steps`` further batches to update
    #: on. It learns a small or slow stream in fewer records for (1 + steps) times the step's
    #: compute; at least ``batch_size``. Unset: one update per micro-batch.
    rehearsal_window_records: int | None = Field(None, ge=1)
    rehearsal_steps: int = Field(1, ge=1, le=1024)

    @model_validator(mode="after")
    def _window_holds_a_batch(self) -> TrainingSettings:
        window = self.rehearsal_window_records
        if window is not None and window < self.batch_size:
            raise ValueError(
                f"training.rehearsal_window_records ({window}) must be at least training.batch_size "
                f"({self.batch_size}): a step writes its whole batch into the window"
            )
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` (in a file or a ``--set``) as false: it means ``"off"``."""
        return "off" if value is False else value


class EvaluationSettings(_Section):
    """Honest evaluation while streaming: a hash-selected held-out reservoir that is never trained on."""

    heldout_fraction: float = Field(0.05, ge=0.0, le=0.5)
    heldout_capacity: int = Field(1_000, ge=1)
    every_steps: int = Field(500, ge=1)
    importance_samples: int = Field(32, ge=1)


_DRIFT = AppliesWhen("drift_detector", ("adwin", "page_hinkley"))
_ANOMALY = AppliesWhen("enabled", (True,))


class AnomalySettings(_Section):
    """Calibrated anomaly flags on the per-record ELBO, drift in the held-out scores, explanations.

    Percentiles are taken against recent *reference* scores: the ELBOs of records that are never
    trained on (the held-out share, and records outside ``training.sample_fraction``), each scored
    before any update saw it; with neither share, every record's prequential score.
    """

    applies_when: ClassVar[Mapping[str, tuple[AppliesWhen, ...]]] = {
        **{
            key: (_ANOMALY,)
            for key in (
                "threshold_percentile",
                "window_records",
                "min_reference_records",
                "sketch_k",
                "train_on_flagged",
                "drift_detector",
            )
        },
        "adapt_records_after_drift": (_ANOMALY, _DRIFT),
        "drift_warmup_records": (_ANOMALY, _DRIFT),
        "drift_response": (_ANOMALY, _DRIFT),
        "adwin_delta": (_ANOMALY, AppliesWhen("drift_detector", ("adwin",))),
        "page_hinkley_delta": (_ANOMALY, AppliesWhen("drift_detector", ("page_hinkley",))),
        "page_hinkley_threshold": (_ANOMALY, AppliesWhen("drift_detector", ("page_hinkley",))),
        "learning_rate_factor": (_ANOMALY, _DRIFT, AppliesWhen("drift_response", ("raise_learning_rate",))),
        "learning_rate_steps": (_ANOMALY, _DRIFT, AppliesWhen("drift_response", ("raise_learning_rate",))),
    }

    #: Percentile, flag, anomalies topic and drift detection (off: latents as before).
    enabled: bool = True
    #: A record is flagged when its anomaly percentile (the share of recent reference scores above
    #: its ELBO) passes this.
    threshold_percentile: float = Field(99.0, gt=0.0, lt=100.0)
    #: Reference scores per sketch window; percentiles use the last one or two windows.
    window_records: int = Field(1_000, ge=10)
    #: No percentile (null) and no flag until the reference holds this many scores.
    min_reference_records: int = Field(200, ge=10)
    #: KLL sketch size (rank error about 1.3% at 200, 0.7% at 400; DataSketches' figures).
    sketch_k: int = Field(200, ge=8, le=65_535)
    #: Whether flagged records are trained on. Off: they are scored and published but left out of
    #: the update, so attacks and faults do not become normal (except while adapting to a drift).
    train_on_flagged: bool = False
    #: River's detector on the stream of reference ELBOs, or none.
    drift_detector: Literal["adwin", "page_hinkley", "none"] = "adwin"
    #: ADWIN's confidence: smaller, fewer false alarms and later detections (scale-free).
    adwin_delta: float = Field(0.002, gt=0.0, lt=1.0)
    #: Page-Hinkley's tolerated change and alarm threshold, in nats: set them against the spread
    #: of the held-out ELBO (a fall of twice delta is what it is after).
    page_hinkley_delta: float = Field(1.0, gt=0.0)
    page_hinkley_threshold: float = Field(50.0, gt=0.0)
    #: Reference scores before detection starts (the first, fast part of learning is no drift).
    drift_warmup_records: int = Field(1_000, ge=0)
    #: After a drift, flagged records are trained on for this many trained records (a filter that
    #: never learns from what it flags never adapts to a real shift); the reference restarts too.
    adapt_records_after_drift: int = Field(5_000, ge=0)
    #: What a drift does to training besides tagging the last snapshot before it: nothing, reset
    #: the optimizer's moments, or multiply the learning rate for a while.
    drift_response: Literal["none", "reset_optimizer", "raise_learning_rate"] = "none"
    learning_rate_factor: float = Field(3.0, gt=1.0, le=100.0)
    learning_rate_steps: int = Field(200, ge=1)
    #: Per record, the input dimensions (or named features) with the lowest log-likelihood under
    #: the decoder at the posterior location, in the latents message; 0 for none.
    explain_top_k: int = Field(0, ge=0, le=64)


class SnapshotSettings(_Section):
    """Where and how often the model, optimizer, RNG and offsets are saved."""

    #: A directory on a local or shared filesystem (encoder replicas read the trainer's snapshots
    #: from it, e.g. on a ReadWriteMany volume). Object-store URLs are not supported.
    dir: Path = Path("snapshots")
    every_steps: int = Field(500, ge=1)
    every_seconds: float = Field(60.0, gt=0.0)
    keep: int = Field(3, ge=1)
    #: The newest held-out records (at most this many) saved in every snapshot, inside its
    #: checksums, so ``streamvi report`` draws the latent map and the reconstructions from the
    #: snapshot alone and a restart resumes the held-out evaluation with them; each costs
    #: (input.dim + input.context_dim) x 4 bytes. 0 saves none; nothing is saved while
    #: evaluation.heldout_fraction is 0.
    sample_records: int = Field(256, ge=0, le=100_000)

    @field_validator("dir", mode="before")
    @classmethod
    def _filesystem_only(cls, value: Any) -> Any:
        text = str(value)
        if "://" in text:
            scheme = text.split("://", 1)[0]
            raise ValueError(
                f"{scheme}:// snapshot stores are not supported: give a directory on a local or shared "
                "filesystem (a ReadWriteMany volume, NFS or a mounted bucket)"
            )
        return value


class MetricsSettings(_Section):
    """The Prometheus / health HTTP endpoint."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)
    lag_interval_seconds: float = Field(5.0, gt=0.0)
    #: /livez answers 503 once the loop has not gone round for this long (a stuck step, snapshot
    #: write, poll or commit), so an orchestrator restarts the daemon; null: always live. The loop
    #: does not go round while it waits for a step (the first one's XLA compile included) or a
    #: snapshot write, a rebalance, a commit, a rewind's back-off (``processing.retry_max_seconds``)
    #: or, at the end, the final checkpoint (``processing.shutdown_grace_seconds``): keep this well
    #: above the longest of those. Start-up (topics, model, restoring the newest snapshot) counts
    #: from the daemon's start.
    liveness_timeout_seconds: float | None = Field(120.0, gt=0.0)


_EXACTLY_ONCE = AppliesWhen("guarantee", ("exactly_once",))


class ProcessingSettings(_Section):
    """Delivery guarantee, shutdown, backpressure and the guard against non-finite updates."""

    applies_when: ClassVar[Mapping[str, tuple[AppliesWhen, ...]]] = {
        "transactional_id": (_EXACTLY_ONCE,),
        "transaction_timeout_ms": (_EXACTLY_ONCE,),
    }

    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    #: exactly_once: the producer's transactional id; null derives ``<kafka.group_id>-streamvi``.
    #: Trainer workers (distribution.strategy=multi_worker) append ``-worker-<index>`` to it.
    transactional_id: str | None = Field(None, min_length=1)
    transaction_timeout_ms: int = Field(60_000, ge=1_000)
    #: After SIGTERM/SIGINT, the final flush, snapshot and commit must finish within this many seconds.
    shutdown_grace_seconds: float = Field(30.0, gt=0.0)
    #: Restore the last good snapshot after this many non-finite updates in a row.
    max_nonfinite_in_a_row: int = Field(10, ge=1)
    #: While a step or a snapshot runs longer than this, the consumer is polled (paused) to stay in its group.
    keepalive_seconds: float = Field(1.0, gt=0.0)
    #: Back-off between attempts while the broker is unreachable, doubling up to ``retry_max_seconds``.
    retry_initial_seconds: float = Field(0.5, gt=0.0)
    retry_max_seconds: float = Field(10.0, gt=0.0)
    #: How long a Python thread may hold the GIL while another waits for it (``sys.setswitchinterval``).
    #: The step thread needs the GIL back after every TensorFlow call; at Python's default of 5 ms,
    #: a busy loop thread makes each of those returns wait and the step runs at a fraction of its speed.
    gil_switch_interval_ms: float = Field(0.2, gt=0.0, le=100.0)

    def transactional_id_for(self, group_id: str, worker_index: int | None = None) -> str:
        """The producer's transactional id: one per trainer, stable across its restarts (a restart
        fences its earlier instance); trainer workers each have their own, by index."""
        base = self.transactional_id or f"{group_id}-streamvi"
        return base if worker_index is None else f"{base}-worker-{worker_index}"


class ServingSettings(_Section):
    """Encoder replicas (``streamvi serve``): consume every record, encode it with the newest
    trusted snapshot in ``snapshots.dir``, publish its latents; never train."""

    applies_when: ClassVar[Mapping[str, tuple[AppliesWhen, ...]]] = {}

    #: The replicas' consumer group: replicas share the input partitions; the trainer keeps
    #: ``kafka.group_id`` (exactly-once: its committed offsets tell which snapshots are trusted).
    group_id: str = Field("streamvi-encoders", min_length=1)
    #: How often a replica looks for a newer trusted snapshot.
    reload_interval_seconds: float = Field(5.0, gt=0.0)
    #: How often a replica flushes its outputs and commits its offsets (exactly-once: one
    #: transaction per interval).
    commit_interval_seconds: float = Field(5.0, gt=0.0)
    #: exactly_once: this replica's transactional id, which must differ between replicas and stay
    #: the same across a replica's restarts (so a restart aborts what its predecessor left open);
    #: null derives ``<serving.group_id>-<hostname>-<pid>`` (stable in a container, whose pid is 1).
    transactional_id: str | None = Field(None, min_length=1)

    def transactional_id_for_this_process(self) -> str:
        return self.transactional_id or f"{self.group_id}-{socket.gethostname()}-{os.getpid()}"


_MULTI_WORKER = AppliesWhen("strategy", ("multi_worker",))


class DistributionSettings(_Section):
    """Synchronous data-parallel training over several trainer workers (one model), with
    TensorFlow's ``MultiWorkerMirroredStrategy``; ``none`` (one process) is the default.

    The cluster is ``workers`` with this worker's ``worker_index``, or, with ``workers`` empty, the
    ``TF_CONFIG`` environment variable as TensorFlow reads it. It is resolved and checked at start
    by :func:`streamvi.cluster.resolve_cluster`.
    """

    applies_when: ClassVar[Mapping[str, tuple[AppliesWhen, ...]]] = dict.fromkeys(
        ("workers", "worker_index", "collective_timeout_seconds"), (_MULTI_WORKER,)
    )

    strategy: Literal["none", "multi_worker"] = "none"
    #: Every worker's ``host:port`` (its collective gRPC server), in worker order, the same list on
    #: every worker; empty: read the cluster from ``TF_CONFIG``.
    workers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: This worker's position in ``workers`` (worker 0 is the chief). Only with ``workers``.
    worker_index: int | None = Field(None, ge=0)
    #: How long a collective (the step's all-reduce) may wait for the other workers before it fails:
    #: the bound on noticing that a worker died. It also bounds how long workers may drift apart.
    collective_timeout_seconds: float = Field(60.0, gt=0.0)

    @field_validator("workers", mode="before")
    @classmethod
    def _split_workers(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return yaml.safe_load(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_cluster(self) -> DistributionSettings:
        if self.strategy != "multi_worker":
            return self
        if self.workers and self.worker_index is None:
            raise ValueError("distribution.worker_index is required with distribution.workers")
        if self.worker_index is not None and not self.workers:
            raise ValueError(
                "distribution.worker_index needs distribution.workers (with TF_CONFIG, this worker's "
                "index is TF_CONFIG's task.index)"
            )
        if self.worker_index is not None and self.worker_index >= len(self.workers):
            raise ValueError(
                f"distribution.worker_index={self.worker_index} is not a position in distribution.workers "
                f"({len(self.workers)} workers)"
            )
        return self


class Settings(BaseSettings):
    """The whole configuration of a streamvi process."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    input: InputSettings = Field(default_factory=InputSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    snapshots: SnapshotSettings = Field(default_factory=SnapshotSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    processing: ProcessingSettings = Field(default_factory=ProcessingSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    distribution: DistributionSettings = Field(default_factory=DistributionSettings)
    anomaly: AnomalySettings = Field(default_factory=AnomalySettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges file, environment and overrides itself, in a documented order.
        return (init_settings,)

    @model_validator(mode="after")
    def _reject_inapplicable(self) -> Settings:
        """A setting given explicitly where it cannot apply is an error naming it, not ignored."""
        problems = [
            reason
            for section in type(self).model_fields
            for key in sorted(getattr(self, section).model_fields_set)
            if (reason := inapplicable_reason(self, f"{section}.{key}")) is not None
        ]
        if problems:
            raise PydanticCustomError("inapplicable_setting", "{problems}", {"problems": "\n".join(problems)})
        return self

    @model_validator(mode="after")
    def _separate_groups(self) -> Settings:
        if self.serving.group_id == self.kafka.group_id:
            raise ValueError(
                "serving.group_id must differ from kafka.group_id: encoder replicas consume every "
                "record in a group of their own beside the trainer's"
            )
        return self

    @model_validator(mode="after")
    def _distributable(self) -> Settings:
        """What the all-reduced step cannot (yet) keep identical on every worker is refused."""
        if self.distribution.strategy != "multi_worker":
            return self
        training = self.training
        if training.mixed_precision == "mixed_float16":
            raise ValueError(
                "distribution.strategy=multi_worker does not support training.mixed_precision="
                "mixed_float16 (per-worker loss scales); use off or mixed_bfloat16"
            )
        if training.rehearsal_window_records is not None:
            raise ValueError(
                "distribution.strategy=multi_worker does not support training.rehearsal_window_records "
                "(each worker would rehearse its own records); leave it unset"
            )
        return self

    def public_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able data with every secret masked.

        Settings that do not apply under the variants chosen (``model.categories`` with a gaussian
        latent, ...) are left out: they have no effect, and a config written from this data loads.
        """
        data = self.model_dump(mode="json")
        for section, values in data.items():
            if isinstance(values, dict):
                for key in [key for key in values if inapplicable_reason(self, f"{section}.{key}")]:
                    del values[key]
        return data


def _section_model(section: str) -> type[_Section] | None:
    annotation = Settings.model_fields[section].annotation if section in Settings.model_fields else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, _Section) else None


def _setting_value(config: Settings | Mapping[str, Any], section: str, key: str) -> Any:
    """A setting's value in settings, or in their JSON data (a key missing there: its default)."""
    if isinstance(config, Settings):
        return getattr(getattr(config, section), key)
    values = config.get(section)
    if isinstance(values, Mapping) and key in values:
        return values[key]
    model = _section_model(section)
    field = model.model_fields.get(key) if model is not None else None
    return field.get_default(call_default_factory=True) if field is not None else None


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return "given"
    return "null" if value is None else str(value)


def inapplicable_reason(config: Settings | Mapping[str, Any], name: str) -> str | None:
    """Why the dotted setting ``name`` cannot apply under ``config``, or None when it applies.

    ``config`` is a :class:`Settings` or its JSON data (e.g. a snapshot's, however old: a key
    missing there stands for its default).
    """
    section, key = name.split(".", 1)
    model = _section_model(section)
    conditions = model.applies_when.get(key, ()) if model is not None else ()
    # a condition's setting is in the same section, or named in full ("input.features")
    where = {c: c.setting if "." in c.setting else f"{section}.{c.setting}" for c in conditions}
    unmet = [
        (condition, value)
        for condition in conditions
        if not condition.holds(value := _setting_value(config, *where[condition].split(".", 1)))
    ]
    if not unmet:
        return None
    needed = " and ".join(c.needed(where[c]) for c in conditions)
    found = ", ".join(f"{where[c]} is {_shown(value)}" for c, value in unmet)
    fix = " and ".join(c.fix(where[c]) for c, _ in unmet)
    return f"{name} applies only with {needed} ({found}); remove it or set {fix}"


def without_inapplicable(config: Mapping[str, Any]) -> dict[str, Any]:
    """Config data without the settings that cannot apply in it (as a snapshot older than this
    check recorded them: every key of every section), so that it loads as :class:`Settings`."""
    return {
        section: (
            {
                key: value
                for key, value in values.items()
                if not inapplicable_reason(config, f"{section}.{key}")
            }
            if isinstance(values, Mapping)
            else values
        )
        for section, values in config.items()
    }


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``section.key=value`` strings into a nested dict; values are parsed as YAML scalars."""
    result: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        parts = [part.strip() for part in dotted.strip().split(".")]
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key segment")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {dotted}: cannot parse value {raw!r}: {exc}") from exc
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {part} is both a value and a section")
        node[parts[-1]] = value
    return result


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return data


def _read_env(environ: Mapping[str, str] | None) -> dict[str, Any]:
    unknown = sorted(
        name
        for name in (environ if environ is not None else os.environ)
        if name.startswith(ENV_PREFIX)
        and name[len(ENV_PREFIX) :].split(ENV_NESTED_DELIMITER, 1)[0].lower() not in Settings.model_fields
        and name not in _CLI_ENV_VARS
    )
    if unknown:
        raise ConfigError(f"unknown setting in environment: {', '.join(unknown)}")
    source = EnvSettingsSource(Settings)
    if environ is not None:
        source.env_vars = {k.lower(): v for k, v in environ.items()}
    try:
        return dict(source())
    except SettingsError as exc:
        raise ConfigError(f"environment: {exc} ({exc.__cause__})") from exc


#: Environment variables read by the CLI itself rather than by the settings model.
_CLI_ENV_VARS = frozenset({"STREAMVI_CONFIG", "STREAMVI_SET", "STREAMVI_LOG_LEVEL", "STREAMVI_MAX_RECORDS"})


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "inapplicable_setting":  # each line names its setting
            lines.extend(message.split("\n"))
            continue
        if item["type"] == "extra_forbidden":
            message = "unknown setting"
        shown = "" if item["type"] == "extra_forbidden" else f" (got {item.get('input')!r})"
        if isinstance(item.get("input"), dict):
            shown = ""
        lines.append(f"{location}: {message}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the frozen settings from a YAML file, the environment and ``--set`` overrides."""
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    data = _deep_merge(data, _read_env(environ))
    data = _deep_merge(data, parse_overrides(overrides))
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc
