"""TLS (a self-signed certificate made here) and bearer-token auth; health checks stay open without a token."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from kvbuffer.service.server.client import KVBufferClient
from kvbuffer.service.server.settings import SettingsError, load_settings
from service_harness import RunningServer, self_signed_certificate

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(certificate: tuple[Path, Path]) -> Iterator[RunningServer]:
    cert_file, key_file = certificate
    running = RunningServer(tls={"cert_file": cert_file, "key_file": key_file}, auth={"token": TOKEN})
    yield running
    running.stop()


def _client(server: RunningServer, certificate: tuple[Path, Path], token: str | None) -> KVBufferClient:
    return KVBufferClient(f"localhost:{server.server.port}", token=token, root_certificates=certificate[0].read_bytes())


def test_tls_with_token_generates(server: RunningServer, certificate: tuple[Path, Path]) -> None:
    async def go() -> int:
        async with _client(server, certificate, TOKEN) as client:
            return len((await client.generate_unary("secure", max_new_tokens=4)).token_ids)

    assert asyncio.run(go()) == 4


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_unauthenticated(server: RunningServer, certificate: tuple[Path, Path],
                                                   token: str | None) -> None:
    async def go() -> None:
        async with _client(server, certificate, token) as client:
            for call in (client.generate_unary("x", max_new_tokens=2), client.model_info()):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _response in client.generate("x", max_new_tokens=2):
                    pass
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await client.health() == "SERVING"  # probes need no token

    asyncio.run(go())


def test_plaintext_client_cannot_talk_to_tls_server(server: RunningServer) -> None:
    async def go() -> None:
        async with KVBufferClient(server.target, token=TOKEN) as client:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.model_info(timeout=5)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(go())


def test_mismatched_key_fails_at_startup(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    other_cert, other_key = self_signed_certificate(tmp_path)
    with pytest.raises(SettingsError, match=r"^tls: cert_file and key_file are not a usable PEM certificate"):
        load_settings({"tls": {"cert_file": certificate[0], "key_file": other_key}})
    with pytest.raises(SettingsError, match=r"^tls: cert_file and key_file must be set together"):
        load_settings({"tls": {"cert_file": other_cert}})
