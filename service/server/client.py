"""A small asyncio client of the kvbuffer.v1 API, and the settings of `kvbuffer generate`.

    async with KVBufferClient("127.0.0.1:50051") as client:
        async for response in client.generate("Hello", max_new_tokens=16):
            print(response.text, end="")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvbuffer.v1 import SERVICE_NAME
from kvbuffer.v1 import kvbuffer_pb2 as pb
from kvbuffer.v1 import kvbuffer_pb2_grpc as pb_grpc
from pydantic import BaseModel, Field, FilePath, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def generate_request(prompt: str | Sequence[int], request_id: str = "", **sampling: Any) -> pb.GenerateRequest:
    """A request for prompt (text, or token ids); sampling takes SamplingParams' field names."""
    request = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**sampling))
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


# Spread calls over every address the target resolves to (a headless Service's pods, or
# `ipv4:10.0.0.1:50051,10.0.0.2:50051`), not only the first: gRPC's round_robin policy.
CHANNEL_OPTIONS = (("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),)


class KVBufferClient:
    """Async client: one channel, optional TLS (root_certificates: PEM; None: the system roots) and bearer token;
    calls are balanced round robin over the target's addresses."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None) -> None:
        if tls or root_certificates is not None:
            self._channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates),
                                                    options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.KVBufferServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def generate(self, prompt: str | Sequence[int], *, request_id: str = "", timeout: float | None = None,
                 **sampling: Any) -> grpc.aio.UnaryStreamCall:
        """Streams GenerateResponses; iterate with `async for`, stop early with `.cancel()`."""
        return self._stub.Generate(generate_request(prompt, request_id, **sampling), timeout=timeout,
                                   metadata=self._metadata)

    async def generate_unary(self, prompt: str | Sequence[int], *, request_id: str = "",
                             timeout: float | None = None, **sampling: Any) -> pb.GenerateResponse:
        return await self._stub.GenerateUnary(generate_request(prompt, request_id, **sampling), timeout=timeout,
                                              metadata=self._metadata)

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    async def server_config(self, timeout: float | None = None) -> pb.ServerConfig:
        return await self._stub.GetServerConfig(pb.GetServerConfigRequest(), timeout=timeout,
                                                metadata=self._metadata)

    async def health(self, service: str = SERVICE_NAME, timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: SERVING or NOT_SERVING."""
        response = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> KVBufferClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class SamplingOptions(BaseModel):
    """The sampling flags of `kvbuffer generate` (SamplingParams' names; unset: the server's defaults)."""

    max_new_tokens: int | None = Field(None, ge=1, description="most tokens to generate (server default: 64)")
    temperature: float | None = Field(None, ge=0, description="0: greedy")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling threshold (1: off)")
    top_k: int | None = Field(None, ge=0, description="sample from the k most likely tokens (0: off)")
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="makes sampling repeatable (a uint64)")
    stop_strings: list[str] | None = Field(None, description="stop when the text ends with this string "
                                                             "(repeatable)")
    ignore_eos: bool | None = Field(None, description="keep generating after end-of-sequence")

    def sampling(self) -> dict[str, Any]:
        return self.model_dump(include=set(SamplingOptions.model_fields), exclude_none=True)


class GenerateSettings(BaseSettings, SamplingOptions):
    """`kvbuffer generate`: where to connect and how to sample; env KVBUFFER_CLIENT_<NAME>, then CLI flags."""

    model_config = SettingsConfigDict(env_prefix="KVBUFFER_CLIENT_", extra="forbid", frozen=True)

    target: str = Field("127.0.0.1:50051", description="server address, host:port; a name with several "
                        "addresses (a headless Service, or ipv4:HOST:PORT,HOST:PORT) is balanced round robin")
    token: SecretStr | None = Field(None, description="bearer token, if the server requires one")
    tls: bool = Field(False, description="connect over TLS (server verified against the system roots or ca_file)")
    ca_file: FilePath | None = Field(None, description="PEM root certificate(s) to verify the server with; "
                                                       "implies tls")
    timeout_s: float | None = Field(None, gt=0, description="deadline of the whole request in seconds")

    def client(self) -> KVBufferClient:
        return KVBufferClient(self.target, token=self.token.get_secret_value() if self.token else None,
                              tls=self.tls, root_certificates=self.ca_file.read_bytes() if self.ca_file else None)
