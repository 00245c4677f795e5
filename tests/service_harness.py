"""A real kvbuffer server for tests: the real engine on the embedded tiny model, on 127.0.0.1 with ephemeral
ports, running in its own event-loop thread so that tests talk to it over real channels."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kvbuffer.service.engine import Engine, build_engine
from kvbuffer.service.server.app import Server
from kvbuffer.service.server.client import KVBufferClient
from kvbuffer.service.server.settings import ServiceSettings, load_settings
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import SpanProcessor

T = TypeVar("T")
START_TIMEOUT_S = 120.0


class RunningServer:
    """Starts on construction; `stop()` drains it. Settings default to loopback, ephemeral ports, CPU."""

    def __init__(self, span_processors: Sequence[SpanProcessor] = (), metric_readers: Sequence[MetricReader] = (),
                 make_engine: Callable[[ServiceSettings], Engine] | None = None, **settings: Any) -> None:
        """make_engine makes the engine from the settings (default: the native engine)."""
        self.settings: ServiceSettings = load_settings({"host": "127.0.0.1", "port": 0, "metrics_port": 0,
                                                        "device": "cpu", "shutdown_grace_period_s": 10.0,
                                                        **settings})
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvbuffer-test-server", daemon=True)
        self._thread.start()
        engine = make_engine(self.settings) if make_engine else build_engine(self.settings.engine_config())
        self.server = Server(self.settings, engine,
                             span_processors=span_processors, metric_readers=metric_readers)
        self.run(self.server.start(), timeout=START_TIMEOUT_S)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Runs coroutine on the server's loop (where the engine and admission live) and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def call(self, function: Callable[[], T]) -> T:
        """Calls function on the server's loop, e.g. to read engine stats between its steps."""
        async def invoke() -> T:
            return function()

        return self.run(invoke())

    def client(self, **options: Any) -> KVBufferClient:
        return KVBufferClient(self.target, **options)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 20.0) -> bool:
        """Polls condition on the server's loop until it holds or timeout passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call(condition):
                return True
            time.sleep(0.02)
        return False

    async def until(self, condition: Callable[[], bool], timeout: float = 20.0) -> bool:
        """wait_until for async tests: the caller's event loop (its client calls) keeps running meanwhile."""
        return await asyncio.to_thread(self.wait_until, condition, timeout)

    def stop(self) -> None:
        self.run(self.server.drain(), timeout=self.settings.shutdown_grace_period_s + 30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 and its key, as PEM files (cert_file, key_file); made with the
    `cryptography` package where installed, else with the openssl command."""
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-keyout", str(key_file), "-out", str(cert_file)], check=True, capture_output=True)
        return cert_file, key_file
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def read_tokens(call: Any, at_least: int) -> int:
    """Reads a Generate stream until at least `at_least` tokens have come (a request known to be decoding); the
    count read."""
    received = 0
    async for response in call:
        received += len(response.token_ids)
        if received >= at_least:
            break
    return received
