"""A TLS listener that speaks just enough of the Kafka protocol to authenticate a client.

The embedded broker keeps users in memory and can only create them over an unauthenticated
listener, so it cannot host a SASL test. This peer answers ApiVersions, SaslHandshake and
SaslAuthenticate (SCRAM-SHA-256/512, RFC 5802, the server side in full: it verifies the client's
proof against the password and signs its reply), requires a client certificate signed by the test
CA, and records what each connection presented. To an authenticated client it describes a cluster of
one broker (itself) with no topics; anything else closes the connection.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from kafka.protocol.metadata import MetadataResponse
from kafka.protocol.metadata.api_versions import ApiVersionsRequest, ApiVersionsResponse
from kafka.protocol.sasl import (
    SaslAuthenticateRequest,
    SaslAuthenticateResponse,
    SaslHandshakeRequest,
    SaslHandshakeResponse,
)

TLS = Path(__file__).parent / "tls"
ITERATIONS = 4096
#: (api_key, min, max) advertised: what a Kafka 3.x broker offers for the calls clients make first.
API_VERSIONS = [
    (0, 0, 9), (1, 0, 13), (2, 0, 7), (3, 0, 12), (8, 0, 8), (9, 0, 8), (10, 0, 4), (11, 0, 9),
    (12, 0, 4), (13, 0, 5), (14, 0, 5), (15, 0, 5), (16, 0, 4), (17, 0, 1), (18, 0, 3), (19, 0, 7),
    (20, 0, 6), (22, 0, 4), (32, 0, 4), (36, 0, 2), (37, 0, 3), (42, 0, 2), (60, 0, 1),
]  # fmt: skip


@dataclass
class Session:
    """What one client connection presented."""

    client_certificate_cn: str | None = None
    client_id: str | None = None
    mechanism: str | None = None
    username: str | None = None
    authenticated: bool = False
    requests: list[int] = field(default_factory=list)


class ScramPeer:
    """Listens on 127.0.0.1 with TLS; accepts users {username: password} over SCRAM."""

    def __init__(self, users: dict[str, str], mechanism: str = "SCRAM-SHA-512") -> None:
        self.users = users
        self.mechanism = mechanism
        self.digest = {"SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-512": hashlib.sha512}[mechanism]
        self.sessions: list[Session] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(TLS / "server.pem", TLS / "server.key")
        context.load_verify_locations(TLS / "ca.pem")
        context.verify_mode = ssl.CERT_REQUIRED
        self._context = context
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scram-peer", daemon=True)

    def __enter__(self) -> ScramPeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()

    @property
    def bootstrap(self) -> str:
        return f"localhost:{self.port}"

    # -- serving ---------------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._socket.accept()
            except TimeoutError:
                continue
            session = Session()
            self.sessions.append(session)
            try:
                raw.settimeout(5)
                with self._context.wrap_socket(raw, server_side=True) as conn:
                    subject = dict(item for rdn in conn.getpeercert()["subject"] for item in rdn)
                    session.client_certificate_cn = subject.get("commonName")
                    self._converse(conn, session)
            except (OSError, ssl.SSLError, ValueError):
                pass  # a refused handshake or a closed connection ends the session
            finally:
                raw.close()

    def _converse(self, conn: ssl.SSLSocket, session: Session) -> None:
        scram: dict[str, bytes] = {}
        while True:
            payload = _read_frame(conn)
            api_key, version, correlation_id = struct.unpack(">hhi", payload[:8])
            session.requests.append(api_key)
            if api_key == 18:
                request = ApiVersionsRequest.decode(payload, version=version, header=True)
                session.client_id = request.header.client_id
                response = ApiVersionsResponse(
                    error_code=0,
                    api_keys=[
                        ApiVersionsResponse.ApiVersion(api_key=k, min_version=lo, max_version=hi)
                        for k, lo, hi in API_VERSIONS
                    ],
                    throttle_time_ms=0,
                )
            elif api_key == 17:
                request = SaslHandshakeRequest.decode(payload, version=version, header=True)
                session.mechanism = request.mechanism
                error = 0 if request.mechanism == self.mechanism else 33  # UNSUPPORTED_SASL_MECHANISM
                response = SaslHandshakeResponse(error_code=error, mechanisms=[self.mechanism])
            elif api_key == 36:
                request = SaslAuthenticateRequest.decode(payload, version=version, header=True)
                reply, error = self._scram_step(request.auth_bytes, scram, session)
                response = SaslAuthenticateResponse(
                    error_code=error,
                    error_message=None if error == 0 else "authentication failed",
                    auth_bytes=reply,
                    session_lifetime_ms=0,
                )
            elif api_key == 3 and session.authenticated:
                # a cluster of one broker (this peer) and no topics: enough for a client to start
                response = MetadataResponse(
                    throttle_time_ms=0,
                    brokers=[
                        MetadataResponse.MetadataResponseBroker(
                            node_id=0, host="localhost", port=self.port, rack=None
                        )
                    ],
                    cluster_id="scram-peer",
                    controller_id=0,
                    topics=[],
                    error_code=0,
                )
            else:
                return  # anything else: this peer has no data to serve
            response.API_VERSION = version
            response.with_header(correlation_id=correlation_id)
            conn.sendall(response.encode(header=True, framed=True))
            if api_key == 36 and response.error_code != 0:
                return

    def _scram_step(self, message: bytes, state: dict[str, bytes], session: Session) -> tuple[bytes, int]:
        text = message.decode()
        if "client_first" not in state:  # "n,,n=<user>,r=<client nonce>"
            bare = text.split(",", 2)[2]
            fields = dict(part.split("=", 1) for part in bare.split(","))
            session.username = fields["n"]
            salt = os.urandom(16)
            nonce = fields["r"] + base64.b64encode(os.urandom(18)).decode()
            server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i={ITERATIONS}"
            state.update(client_first=bare.encode(), server_first=server_first.encode(), salt=salt)
            return server_first.encode(), 0
        # "c=biws,r=<nonce>,p=<proof>"
        without_proof, proof_b64 = text.rsplit(",p=", 1)
        auth_message = b",".join([state["client_first"], state["server_first"], without_proof.encode()])
        password = self.users.get(session.username or "")
        if password is None:
            return b"", 58  # SASL_AUTHENTICATION_FAILED
        salted = hashlib.pbkdf2_hmac(self.digest().name, password.encode(), state["salt"], ITERATIONS)
        client_key = hmac.new(salted, b"Client Key", self.digest).digest()
        stored_key = self.digest(client_key).digest()
        signature = hmac.new(stored_key, auth_message, self.digest).digest()
        proof = base64.b64decode(proof_b64)
        recovered = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(self.digest(recovered).digest(), stored_key):
            return b"", 58
        session.authenticated = True
        server_key = hmac.new(salted, b"Server Key", self.digest).digest()
        server_signature = hmac.new(server_key, auth_message, self.digest).digest()
        return b"v=" + base64.b64encode(server_signature), 0


def _read_exact(conn: ssl.SSLSocket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


def _read_frame(conn: ssl.SSLSocket) -> bytes:
    (size,) = struct.unpack(">i", _read_exact(conn, 4))
    return _read_exact(conn, size)
