"""Security settings reach the Kafka clients, and secrets never leave the process.

The SASL_SSL test runs the daemon's real Kafka clients against a TLS listener that demands a client
certificate and verifies SCRAM proofs (tests/integration/scram_peer.py): authentication succeeds
only if the CA, the client certificate, its encrypted key and key password, the mechanism, the
user name and the password all reached kafka-python.
"""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner
from kafka.net.sasl.scram import SaslMechanismScram

from streamvi.cli.main import cli
from streamvi.config import load_settings
from streamvi.io.codecs import RecordDecoder
from streamvi.io.kafka_sink import KafkaOutputSink
from streamvi.io.kafka_source import KafkaRecordSource
from streamvi.io.memory import MemorySink, MemorySource
from streamvi.runtime import build_trainer, snapshot_meta
from streamvi.snapshots import SnapshotStore
from streamvi.stream import CheckpointPolicy, OnlineLoop, OutputTopics
from tests.integration.scram_peer import TLS, ScramPeer, Session
from tests.unit.test_loop import records

pytestmark = pytest.mark.integration

PASSWORD = "pw-7f3a9c-not-for-logs"
KEY_PASSWORD = "client-key-pass"


def secure_overrides(bootstrap: str, mechanism: str = "SCRAM-SHA-512") -> list[str]:
    return [
        f"kafka.bootstrap_servers={bootstrap}",
        "kafka.security_protocol=SASL_SSL",
        f"kafka.sasl_mechanism={mechanism}",
        "kafka.sasl_username=streamvi-svc",
        f"kafka.ssl_cafile={TLS / 'ca.pem'}",
        f"kafka.ssl_certfile={TLS / 'client.pem'}",
        f"kafka.ssl_keyfile={TLS / 'client.key'}",
        "kafka.request_timeout_ms=10000",
    ]


def secure_env() -> dict[str, str]:
    """Secrets come from the environment, as a container gets them from a secret store."""
    return {"STREAMVI_KAFKA__SASL_PASSWORD": PASSWORD, "STREAMVI_KAFKA__SSL_PASSWORD": KEY_PASSWORD}


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256"])
def test_sasl_ssl_scram_and_tls_settings_reach_the_daemons_clients(mechanism, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="kafka")  # the CLI quiets "kafka"; other tests may have run it
    with ScramPeer({"streamvi-svc": PASSWORD}, mechanism) as peer:
        settings = load_settings(overrides=secure_overrides(peer.bootstrap, mechanism), environ=secure_env())
        sink = KafkaOutputSink(settings.kafka)
        sink.close()
        source = KafkaRecordSource(settings.kafka)
        source.close()
    assert len(peer.sessions) >= 2, "the producer and the consumer each connected"
    for session in peer.sessions:
        # mutual TLS: the client checked the server against ssl_cafile (hostname included) and
        # presented ssl_certfile, whose key it decrypted with ssl_password
        assert session.client_certificate_cn == "streamvi-client"
        assert session.client_id == settings.kafka.client_id
        assert session.mechanism == mechanism
        assert session.username == "streamvi-svc"
        assert session.authenticated, "the SCRAM proof matched the configured password"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "streamvi-svc" in logged, "kafka-python logged the authentication at DEBUG/INFO"
    assert PASSWORD not in logged and KEY_PASSWORD not in logged


def test_the_peer_refuses_a_wrong_password():
    """The SCRAM check above is real: a proof made with another password does not verify."""
    peer = ScramPeer({"streamvi-svc": PASSWORD})
    try:
        for password, accepted in ((PASSWORD, True), ("not-the-password", False)):
            client = SaslMechanismScram(
                sasl_plain_username="streamvi-svc",
                sasl_plain_password=password,
                sasl_mechanism="SCRAM-SHA-512",
                security_protocol="SASL_SSL",
            )
            session, state = Session(), {}
            first, error = peer._scram_step(client.auth_bytes(), state, session)
            assert error == 0
            client.receive(first)
            _, error = peer._scram_step(client.auth_bytes(), state, session)
            assert (error == 0) is accepted and session.authenticated is accepted
    finally:
        peer._socket.close()


def test_config_show_masks_every_secret():
    env = {**secure_env(), "STREAMVI_KAFKA__BOOTSTRAP_SERVERS": "localhost:9093"}
    result = CliRunner().invoke(
        cli, [*(arg for o in secure_overrides("b:9093") for arg in ("--set", o)), "config", "show"], env=env
    )
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output and KEY_PASSWORD not in result.output
    assert result.output.count("'**********'") == 2
    assert "sasl_username: streamvi-svc" in result.output


def test_snapshot_meta_holds_no_secret(tmp_path):
    settings = load_settings(
        overrides=[
            *secure_overrides("b:9093"),
            "input.dim=6",
            "model.latent_dim=2",
            "model.encoder_hidden=[8]",
            "training.batch_size=4",
        ],
        environ=secure_env(),
    )
    loop = OnlineLoop(
        source=MemorySource(records(12)),
        sink=MemorySink(),
        decoder=RecordDecoder("json", 6, 4096),
        trainer=build_trainer(settings),
        store=SnapshotStore(tmp_path),
        topics=OutputTopics("lat", "met", "dlq"),
        policy=CheckpointPolicy(every_steps=2, every_seconds=3600),
        max_batch_latency_seconds=0.05,
        snapshot_meta=snapshot_meta(settings),
    )
    loop.restore()
    loop.run(max_records=12)
    snapshots = SnapshotStore(tmp_path).candidates()
    assert snapshots
    for path in snapshots:
        text = (path / "meta.json").read_text()
        assert PASSWORD not in text and KEY_PASSWORD not in text
        kafka = json.loads(text)["config"]["kafka"]
        assert kafka["sasl_password"] == kafka["ssl_password"] == "**********"
        assert kafka["sasl_username"] == "streamvi-svc"
