"""Settings of `kvbuffer serve`: one pydantic-settings model, read from the environment, a YAML or TOML
file and CLI flags.

Precedence, lowest to highest: defaults, environment (`KVBUFFER_BUFFER_SIZE`, nested groups with `__`:
`KVBUFFER_TLS__CERT_FILE`), the config file (`--config`), CLI flags. The engine settings carry exactly
the names of `EngineConfig` (DESIGN.md, "Settings"): the service, the custom resource and the Helm chart
share one vocabulary, and `engine_config()` hands them to the native engine unchanged.

`engine: sglang` serves through SGLang instead (kvbuffer.service.sglang): the shared settings map onto SGLang's
(`model`, `max_running_requests`, `speculative_algorithm`, ...; the mapping is in kvbuffer.service.sglang.settings)
and the `sglang` group passes SGLang's own settings (tensor and expert parallel, quantization, memory fraction,
...) by SGLang's names. SGLang's ServerArgs checks the whole combination at start-up (it needs the model's
config and the GPUs); what can be checked without them is checked here.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from kvbuffer.service.engine.config import EngineConfig
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "KVBUFFER_"
ENV_NESTED_DELIMITER = "__"
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}  # without building one: no torch import


class SettingsError(ValueError):
    """Settings that cannot be used; the message names each bad setting and what it allows."""


class TLSSettings(BaseModel):
    """Serve over TLS when both files are given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: FilePath | None = Field(None, description="PEM certificate chain of the server (TLS is on "
                                                         "when cert_file and key_file are both set)")
    key_file: FilePath | None = Field(None, description="PEM private key of cert_file")

    @model_validator(mode="after")
    def _usable(self) -> TLSSettings:
        """A certificate that does not parse or does not match its key fails start-up, not the first handshake."""
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together (or neither)")
        if self.cert_file is not None:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"cert_file and key_file are not a usable PEM certificate and key: {exc}") from None
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class AuthSettings(BaseModel):
    """Bearer-token auth: health checks stay open so that probes and load balancers need no token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: SecretStr | None = Field(None, description="if set, every RPC except health checks must carry "
                                                      "the metadata `authorization: Bearer <token>`")


def _engine_default(name: str) -> Any:
    return _DEFAULTS[name]


def _json_object(value: Any) -> Any:
    """A JSON object given as text (a CLI flag) becomes a dict; anything else is left to the type check."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object: {exc}") from None
    return value


class SGLangSettings(BaseModel):
    """SGLang's own settings, by SGLang's names (`sglang serve --help`), for `engine: sglang`. Unset (None)
    leaves SGLang's default, which SGLang derives from the GPU and the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tp_size: int = Field(1, ge=1, description="tensor parallel size: GPUs the model of one replica is split over")
    ep_size: int = Field(1, ge=1, description="expert parallel size: the MoE experts are split over this many "
                                              "of the tp_size GPUs (divides tp_size)")
    quantization: str | None = Field(None, description="weight quantization method, e.g. fp8 (FP8 checkpoints "
                                                       "load as they are; bf16 weights are quantized at load)")
    mem_fraction_static: float | None = Field(None, gt=0, lt=1, description="fraction of GPU memory for the "
                                              "weights and the KV-cache and state pools")
    chunked_prefill_size: int | None = Field(None, ge=-1, description="most prompt tokens prefilled in one step; "
                                             "-1 turns chunked prefill off")
    cuda_graph_bs: list[int] | None = Field(None, description="decode batch sizes captured as CUDA graphs "
                                            "(repeatable; unset: SGLang's list up to cuda_graph_max_batch)")
    speculative_num_steps: int | None = Field(None, ge=1, description="draft steps per verify for nextn/eagle "
                                              "speculation")
    speculative_eagle_topk: int | None = Field(None, ge=1, description="drafts branched per step for "
                                               "nextn/eagle (1: a chain)")
    speculative_draft_model_path: str | None = Field(None, description="draft model directory for eagle/eagle3 "
                                                     "(nextn uses the model's own MTP layers)")
    enable_deterministic_inference: bool = Field(False, description="deterministic kernels; needed for "
                                                 "per-request sampling seeds (sampling.seed), which SGLang "
                                                 "ignores otherwise")
    extra_server_args: Annotated[dict[str, str], BeforeValidator(_json_object)] = Field(
        default_factory=dict, description="further SGLang server arguments as a JSON object of strings, by "
        "ServerArgs name, written as on SGLang's command line, e.g. {\"attention_backend\": \"triton\"}")

    @field_validator("ep_size")
    @classmethod
    def _divides_tp_size(cls, ep_size: int, info: ValidationInfo) -> int:
        tp_size = info.data.get("tp_size", 1)
        if tp_size % ep_size:
            raise ValueError(f"must divide sglang.tp_size ({tp_size}), got {ep_size}")
        return ep_size


class ServiceSettings(BaseSettings):
    """Everything `kvbuffer serve` can be told; `kvbuffer serve --help` lists it."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER,
                                      extra="forbid", frozen=True)

    # Serving.
    host: str = Field("0.0.0.0", description="address the gRPC server listens on")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port)")
    metrics_port: int = Field(9464, ge=0, le=65535, description="HTTP port of the Prometheus /metrics "
                                                                "endpoint (0: any free port)")
    shutdown_grace_period_s: float = Field(30.0, gt=0, le=3600, description="on SIGTERM, seconds in-flight "
                                           "requests get to finish before they are cancelled")
    max_connection_age_s: float = Field(300.0, ge=0, description="a client connection is closed (after its "
                                        "in-flight requests end) once this old, so that clients re-resolve the "
                                        "service name and spread over replicas added since; 0: never")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")
    startup_report_s: float = Field(600.0, ge=0, description="a start-up (the engine loading, SGLang "
                                    "launching) still running after this many seconds logs one line and the "
                                    "Python stacks of the server and of its SGLang processes, once; 0: never")
    engine: Literal["native", "sglang"] = Field("native", description="native: the embedded engine (CPU or "
                                                "one GPU, no download); sglang: SGLang in this process, for "
                                                "real checkpoints on one or more GPUs (settings group sglang)")

    # Engine: exactly EngineConfig's names and defaults.
    model: str = Field(_engine_default("model"), description="Hugging Face model directory, or "
                       "'embedded:tiny-qwen3-next' for the built-in tiny model")
    device: Literal["auto", "cpu", "cuda"] = Field(_engine_default("device"), description="auto: CUDA if "
                                                   "available, else CPU")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(_engine_default("dtype"), description="auto: "
                                                          "bfloat16 on CUDA, float32 on CPU")
    decode_mode: Literal["kvbuffer", "recurrent"] = Field(_engine_default("decode_mode"), description=
                                                          "kvbuffer (checkpoint + buffer) or recurrent "
                                                          "(the baseline)")
    buffer_size: int = Field(_engine_default("buffer_size"), ge=1, description="tokens a request may hold "
                             "in its buffer per layer; shorter contexts hold no state")
    chunk_size: int = Field(_engine_default("chunk_size"), ge=1, description="once a request has a state, "
                            "its buffer is folded in every chunk_size tokens; chunk_size + "
                            "speculative_num_draft_tokens <= buffer_size")
    speculative_algorithm: Literal["none", "ngram", "nextn", "eagle", "eagle3"] = Field(
        _engine_default("speculative_algorithm"), description="speculative decoding algorithm; nextn (the "
        "model's MTP layers), eagle and eagle3 need engine sglang")
    speculative_num_draft_tokens: int = Field(_engine_default("speculative_num_draft_tokens"), ge=0, le=16,
                                              description="draft tokens proposed per step when "
                                                          "speculation is on")
    max_running_requests: int = Field(_engine_default("max_running_requests"), ge=1, description=
                                      "requests decoded concurrently")
    max_waiting_requests: int = Field(_engine_default("max_waiting_requests"), ge=1, description=
                                      "requests that may wait for a running slot; beyond running + "
                                      "waiting, new requests get RESOURCE_EXHAUSTED")
    max_num_batched_tokens: int = Field(_engine_default("max_num_batched_tokens"), ge=1, description=
                                        "token budget of one engine step (prefill chunks + decodes)")
    max_context_length: int = Field(_engine_default("max_context_length"), ge=1, description=
                                    "longest context (prompt + completion) in tokens")
    memory_budget_bytes: int = Field(_engine_default("memory_budget_bytes"), ge=1, description=
                                     "bytes the state, buffer and KV-cache pools are sized from at start")
    cuda_graph_max_batch: int = Field(_engine_default("cuda_graph_max_batch"), ge=0, description=
                                      "decode steps of up to this many requests run padded to a fixed shape, "
                                      "on CUDA by replaying a captured CUDA graph (one launch instead of "
                                      "hundreds); 0 turns this off")
    seed: int = Field(_engine_default("seed"), description="seed of the embedded model's generated weights "
                      "(requests sample from their own seed, or at random)")

    # SGLang (engine: sglang).
    sglang: SGLangSettings = Field(default_factory=SGLangSettings, description="SGLang")

    # Security.
    tls: TLSSettings = Field(default_factory=TLSSettings, description="TLS")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="bearer-token auth")

    @model_validator(mode="after")
    def _engine_accepts(self) -> ServiceSettings:
        """The engine's own checks (e.g. chunk_size + drafts <= buffer_size) fail start-up, not the first request."""
        if self.engine == "sglang":
            from kvbuffer.service.sglang.settings import check_settings  # no SGLang import: checks it can do alone

            check_settings(self)
            return self
        if self.sglang != SGLangSettings():
            raise ValueError("sglang: SGLang's settings need engine sglang")
        if self.speculative_algorithm not in ("none", "ngram"):
            raise ValueError(f"speculative_algorithm: {self.speculative_algorithm} needs engine sglang (the native "
                             "engine drafts with none or ngram)")
        self.engine_config()
        return self

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)})

    @property
    def max_in_flight_requests(self) -> int:
        """The service's own bound on requests in flight: what the engine may run plus what it may queue."""
        return self.max_running_requests + self.max_waiting_requests


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a YAML (.yaml, .yml) or TOML (.toml) file, keyed like the settings (`tls: {cert_file: ..}`)."""
    if not path.is_file():
        raise SettingsError(f"config file {path}: no such file")
    readers = {".yaml": lambda: YamlConfigSettingsSource(ServiceSettings, yaml_file=path)(),
               ".yml": lambda: YamlConfigSettingsSource(ServiceSettings, yaml_file=path)(),
               ".toml": lambda: TomlConfigSettingsSource(ServiceSettings, toml_file=path)()}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise SettingsError(f"config file {path}: unknown format (allowed: .yaml, .yml, .toml)")
    try:
        return dict(reader())
    except Exception as exc:  # yaml/toml parse errors have no common base class
        raise SettingsError(f"config file {path}: {exc}".replace("\n", " ")) from None


def _merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(low)
    for key, value in high.items():
        below = merged.get(key)
        merged[key] = _merge(below, value) if isinstance(below, Mapping) and isinstance(value, Mapping) else value
    return merged


def load_settings(cli_values: Mapping[str, Any] | None = None, config_file: Path | None = None) -> ServiceSettings:
    """Settings from the environment, overridden by config_file, overridden by cli_values (nested dicts).

    Raises SettingsError with one line per bad setting.
    """
    file_values = read_config_file(config_file) if config_file else {}
    try:
        return ServiceSettings(**_merge(file_values, cli_values or {}))
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    """One line per error: the setting's name, what is wrong and the value given."""
    lines = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        elif error["type"] != "value_error":
            message = f"{message} (got {error['input']!r})"
        lines.append(f"{name}: {message}" if name else message)
    return "\n".join(lines)
