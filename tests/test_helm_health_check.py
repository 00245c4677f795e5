"""`python -m kvbuffer.service.server.health_check`, the probe of TLS-serving pods and the helm test pod's first
step, against a real server on loopback: plaintext and TLS, and the failures a probe must report as failures."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_harness import RunningServer, self_signed_certificate

CHECK = [sys.executable, "-m", "kvbuffer.service.server.health_check"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CHECK, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def plain() -> Iterator[RunningServer]:
    server = RunningServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    cert_file, key_file = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    server = RunningServer(tls={"cert_file": cert_file, "key_file": key_file})
    yield server, cert_file
    server.stop()


def test_serving_plaintext_server_passes(plain: RunningServer) -> None:
    result = _run(plain.target)
    assert result.returncode == 0 and "SERVING" in result.stdout, result.stderr


def test_serving_tls_server_passes_when_its_certificate_checks(secure: tuple[RunningServer, Path]) -> None:
    server, cert_file = secure
    result = _run(server.target, "--ca-file", str(cert_file), "--server-name", "localhost")
    assert result.returncode == 0, result.stderr


def test_tls_server_fails_for_a_name_its_certificate_lacks(secure: tuple[RunningServer, Path]) -> None:
    server, cert_file = secure
    result = _run(server.target, "--ca-file", str(cert_file), "--server-name", "elsewhere.example", "--timeout-s", "3")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


def test_draining_server_fails(tmp_path: Path) -> None:
    server = RunningServer()
    server.run(server.server.health.enter_graceful_shutdown())  # what a drain does first
    try:
        result = _run(server.target)
        assert result.returncode == 1 and "NOT_SERVING" in result.stdout
    finally:
        server.stop()


def test_nothing_listening_fails_with_one_line() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _run(f"127.0.0.1:{port}", "--timeout-s", "2")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1


def test_missing_ca_file_is_a_usage_error(tmp_path: Path) -> None:
    result = _run("127.0.0.1:1", "--ca-file", str(tmp_path / "absent.pem"))
    assert result.returncode == 2 and "absent.pem" in result.stderr
