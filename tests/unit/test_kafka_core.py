"""The Kafka core both client adapters share (streamvi.io.kafka_core): the transaction lifecycle's
back-off is ``processing.retry_*``, on either client; the client libraries are replaced by fakes
that fail on cue (the adapters on a real broker: tests/integration/test_io_contract.py)."""

from __future__ import annotations

import types
from typing import Any

import pytest
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException
from kafka.errors import KafkaError

from streamvi.config import load_settings
from streamvi.errors import CommitError
from streamvi.io import kafka_sink, rdkafka_sink
from streamvi.io.base import OutputMessage
from streamvi.io.kafka_core import Backoff, FailureLatch, sinks
from streamvi.io.kafka_sink import KafkaTransactionalSink
from streamvi.io.rdkafka_sink import RdKafkaTransactionalSink

MESSAGE = OutputMessage("out", b"k", b"v")


def test_backoff_doubles_up_to_its_maximum_and_defaults_to_the_settings_defaults():
    processing = load_settings(environ={}).processing
    default = Backoff()
    assert (default.initial_seconds, default.max_seconds) == (
        processing.retry_initial_seconds,
        processing.retry_max_seconds,
    )
    delays = default.delays()
    assert [next(delays) for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    delays = Backoff(0.1, 0.3).delays()
    assert [next(delays) for _ in range(4)] == [0.1, 0.2, 0.3, 0.3]
    assert next(Backoff(20.0, 10.0).delays()) == 10.0


def test_the_failure_latch_keeps_the_first_failure_and_reports_it_once():
    latch = FailureLatch()
    latch.failed(ValueError("first"))
    latch.failed("second", fatal=True)
    with pytest.raises(Exception, match="not delivered: first"):
        latch.raise_if_failed()
    latch.raise_if_failed()
    assert latch.take_unusable() and not latch.take_unusable()


class Script:
    """What the fake client libraries do: how many ``init_transactions`` calls fail from now on,
    and what each producer was asked."""

    def __init__(self, error: type[Exception] | Any) -> None:
        self.error = error
        self.failing_inits = 0
        self.producers: list[FakeProducer] = []


class FakeProducer:
    """A transactional producer of either library (it takes and ignores either's arguments)."""

    script: Script

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.calls: list[str] = []
        self.script.producers.append(self)

    def _fail(self, what: str) -> None:
        raise self.script.error(what)

    def init_transactions(self, *timeout: float) -> None:
        self.calls.append("init")
        if self.script.failing_inits:
            self.script.failing_inits -= 1
            self._fail("no broker answers")

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def abort_transaction(self, *timeout: float) -> None:
        self.calls.append("abort")
        self._fail("the coordinator is gone")

    def close(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("close")

    def purge(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append("purge")

    def send(self, *args: Any, **kwargs: Any) -> Any:
        return types.SimpleNamespace(add_errback=lambda callback: None)

    def produce(self, *args: Any, **kwargs: Any) -> None:
        return None

    def poll(self, timeout: float) -> int:
        return 0


def _rdkafka_error(what: str) -> KafkaException:
    return KafkaException(RdKafkaError(RdKafkaError._TRANSPORT, what))


@pytest.fixture(params=["kafka-python", "librdkafka"])
def transactional(request, monkeypatch):
    """A factory of the client's transactional sink on a fake library, and the sleeps it takes."""
    if request.param == "kafka-python":
        module, sink_type, script = kafka_sink, KafkaTransactionalSink, Script(KafkaError)
        monkeypatch.setattr(module, "KafkaProducer", type("P", (FakeProducer,), {"script": script}))
    else:
        module, sink_type, script = rdkafka_sink, RdKafkaTransactionalSink, Script(_rdkafka_error)
        monkeypatch.setattr(module, "Producer", type("P", (FakeProducer,), {"script": script}))
    sleeps: list[float] = []
    monkeypatch.setattr(sinks, "time", types.SimpleNamespace(sleep=sleeps.append))
    settings = load_settings(environ={}).kafka

    def make(*backoff: Backoff) -> Any:
        return sink_type(settings, "tx", 60_000, *backoff)

    return make, script, sleeps


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [((), [0.5, 1.0, 2.0, 4.0]), ((Backoff(0.1, 0.3),), [0.1, 0.2, 0.3, 0.3])],
    ids=["defaults", "configured"],
)
def test_a_fenced_producer_is_restarted_with_the_configured_backoff(transactional, backoff, expected):
    make, script, sleeps = transactional
    sink = make(*backoff)
    sink.send(MESSAGE)
    sink.abort_transaction()  # the abort fails: the producer is dropped, to be fenced by a new one
    (dropped,) = script.producers
    assert dropped.calls[-2:] in (["abort", "close"], ["abort", "purge"])
    script.failing_inits = 4  # the broker is unreachable for four attempts
    sink.send(MESSAGE)
    assert sleeps == expected
    assert len(script.producers) == 1 + 5
    restarted = script.producers[-1]
    assert restarted.calls == ["init", "begin"]
    sink.close()


def test_a_failed_start_releases_its_producer(transactional):
    make, script, _ = transactional
    script.failing_inits = 1
    with pytest.raises(Exception, match="no broker answers"):
        make()
    (producer,) = script.producers
    assert producer.calls[0] == "init" and producer.calls[-1] in ("close", "purge")


def test_librdkafka_retries_a_retriable_commit_after_the_initial_backoff(monkeypatch):
    script = Script(_rdkafka_error)
    attempts: list[str] = []

    class Producer(FakeProducer):
        def send_offsets_to_transaction(self, *args: Any) -> None:
            attempts.append("offsets")
            if len(attempts) < 3:
                raise KafkaException(
                    RdKafkaError(RdKafkaError._TIMED_OUT, "coordinator moving", retriable=True)
                )

        def commit_transaction(self, *timeout: float) -> None:
            attempts.append("commit")

    Producer.script = script
    monkeypatch.setattr(rdkafka_sink, "Producer", Producer)
    sleeps: list[float] = []
    monkeypatch.setattr(rdkafka_sink, "time", types.SimpleNamespace(sleep=sleeps.append))
    sink = RdKafkaTransactionalSink(load_settings(environ={}).kafka, "tx", 60_000, Backoff(0.05, 1.0))
    sink.commit_transaction({("in", 0): 3}, object())
    assert attempts == ["offsets", "offsets", "offsets", "commit"] and sleeps == [0.05, 0.05]

    class Fenced(Producer):
        def commit_transaction(self, *timeout: float) -> None:
            raise KafkaException(RdKafkaError(RdKafkaError._FENCED, "fenced", fatal=True))

    Fenced.script = script
    monkeypatch.setattr(rdkafka_sink, "Producer", Fenced)
    fenced = RdKafkaTransactionalSink(load_settings(environ={}).kafka, "tx", 60_000)
    with pytest.raises(CommitError, match="committing the transaction tx failed"):
        fenced.commit_transaction({("in", 0): 3}, object())
    assert script.producers[-1].calls[-1] == "purge"  # dropped: the next send starts a new one


def test_the_daemon_gives_its_transactional_sink_the_processing_retry_settings(monkeypatch):
    from streamvi import runtime

    made: dict[str, Any] = {}

    def transactional_sink(*args: Any) -> Any:
        made["args"] = args
        return types.SimpleNamespace(close=lambda: None)

    monkeypatch.setattr(runtime, "KafkaTransactionalSink", transactional_sink)
    monkeypatch.setattr(runtime, "record_source", lambda kafka, isolation_level: isolation_level)
    settings = load_settings(
        overrides=[
            "processing.guarantee=exactly_once",
            "processing.retry_initial_seconds=0.25",
            "processing.retry_max_seconds=4",
        ],
        environ={},
    )
    _, isolation_level = runtime.kafka_clients(settings)
    assert isolation_level == "read_committed"
    assert made["args"][-1] == Backoff(0.25, 4.0)
