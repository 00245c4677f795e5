"""The spec of a KVBufferService as the operator reads it, and the check that keeps an invalid edit from a pod.

`spec.settings` holds service settings by their own names; they are validated by the service's own model
(`ServiceSettings`, the single source of truth), so an edit the server would refuse at start-up is refused here,
before any ConfigMap changes. Some settings are fixed by the operator rather than per CR (OPERATOR_SETTINGS).
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from kvbuffer.operator.autoscaling.config import AutoscalingSpec
from kvbuffer.operator.resource import GRPC_PORT, METRICS_PORT
from kvbuffer.service.server.settings import ENV_PREFIX, ServiceSettings
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

# Settings a CR does not carry, and why: the ports are what the Services, probes and the autoscaler's scrape use;
# `model` and `engine` are spec fields of their own; `device` follows gpusPerReplica; TLS files and the auth token
# are files and secrets, which belong in mounted Secrets, not in a resource anyone who can read it sees.
OPERATOR_SETTINGS = frozenset({"host", "port", "metrics_port", "model", "engine", "device", "tls", "auth"})
CR_SETTINGS = tuple(name for name in ServiceSettings.model_fields if name not in OPERATOR_SETTINGS)
# The tensor-parallel setting of the engine that has one (SGLang's name); rendered only where the settings have it.
TENSOR_PARALLEL_SETTING = "tp_size"

# The pod volumes the operator renders itself (kvbuffer.operator.render): spec.volumes may not reuse their names.
RESERVED_VOLUMES = frozenset({"config", "home", "tmp", "shm"})
# The environment variable the operator sets itself (the service's name in traces). spec.env may not take it, nor
# ENV_PREFIX's (the service's settings): settings reach a pod only through spec.settings, where they are checked.
RESERVED_ENV = frozenset({"OTEL_SERVICE_NAME"})
Engine = ServiceSettings.model_fields["engine"].annotation  # the engines the service offers
DEFAULT_IMAGE = f"kvbuffer:{importlib.metadata.version('kvbuffer')}"


class SpecError(ValueError):
    """A spec the operator refuses; one line per bad field, named by its path under `spec`."""


class Resources(BaseModel):
    """core/v1 ResourceRequirements without claims: quantities by resource name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limits: dict[str, int | str] = Field(default_factory=dict, description="most of each resource a replica may "
                                         "use, e.g. cpu: 8, memory: 64Gi")
    requests: dict[str, int | str] = Field(default_factory=dict, description="what a replica is scheduled with")


class EnvVar(BaseModel):
    """core/v1 EnvVar: a name and a value, or a valueFrom source (a Secret's or ConfigMap's key, a pod field)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="variable name; not "
                      f"{', '.join(sorted(RESERVED_ENV))} nor {ENV_PREFIX}* (the operator's)")
    value: str = Field("", description="its value")
    value_from: dict[str, Any] = Field(default_factory=dict, description="its source instead of a value "
                                       "(core/v1 EnvVarSource: secretKeyRef, configMapKeyRef, fieldRef, ...)")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if self.value and self.value_from:
            raise ValueError(f"env {self.name}: value and valueFrom exclude each other")
        return self

    def reserved(self) -> bool:
        return self.name in RESERVED_ENV or self.name.startswith(ENV_PREFIX)


class KVBufferServiceSpec(BaseModel):
    """A fleet of `kvbuffer serve` replicas of one model, tuned by the service's own settings."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
                              protected_namespaces=())

    model: str = Field(min_length=1, description="Hugging Face model directory (a path inside the image or a "
                       "mounted volume) or 'embedded:tiny-qwen3-next'; immutable: another model is another "
                       "KVBufferService")
    image: str = Field(DEFAULT_IMAGE, min_length=1, description="container image of kvbuffer")
    engine: Engine = Field("native", description="engine implementation of the replicas")
    replicas: int = Field(1, ge=0, le=1000, description="replicas wanted when autoscaling is off; with it on, "
                          "the operator writes its decisions here (scale subresource), and the pods are kept "
                          "within [minReplicas, maxReplicas]")
    gpus_per_replica: int = Field(0, ge=0, le=64, description="GPUs (nvidia.com/gpu) each replica gets; 0 runs "
                                  "on CPU; a multiple of tensorParallelSize")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one model copy is split across")
    resources: Resources = Field(default_factory=Resources, description="CPU and memory of each replica (the "
                                 "GPUs come from gpusPerReplica)")
    node_selector: dict[str, str] = Field(default_factory=dict, description="node labels a replica's node must "
                                          "carry (the pods' nodeSelector), e.g. a GPU pool's")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="the pods' tolerations "
                                              "(core/v1 Toleration), e.g. of a GPU pool's taint nvidia.com/gpu")
    volumes: list[dict[str, Any]] = Field(default_factory=list, description="volumes added to each pod "
                                          "(core/v1 Volume), e.g. the model's PersistentVolumeClaim; not named "
                                          f"{', '.join(sorted(RESERVED_VOLUMES))} (the operator's)")
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list, description="mounts of `volumes` into the "
                                                "server container (core/v1 VolumeMount), e.g. the model directory")
    env: list[EnvVar] = Field(default_factory=list, description="environment variables of the server "
                              "container (core/v1 EnvVar), e.g. OTEL_EXPORTER_OTLP_ENDPOINT to export traces")
    settings: dict[str, Any] = Field(default_factory=dict, description="service settings by their own names "
                                     "(buffer_size, chunk_size, decode_mode, ...: `kvbuffer serve --help`); "
                                     "unset ones keep the service's defaults")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="sizing the fleet from "
                                         "its decode-path telemetry")

    @model_validator(mode="after")
    def _consistent(self) -> KVBufferServiceSpec:
        if self.gpus_per_replica % self.tensor_parallel_size:
            raise ValueError(f"gpusPerReplica ({self.gpus_per_replica}) must be a multiple of "
                             f"tensorParallelSize ({self.tensor_parallel_size})")
        if self.tensor_parallel_size > 1 and self.engine != "sglang":
            raise ValueError("tensorParallelSize > 1 needs engine sglang (the native engine runs one GPU)")
        names = [volume.get("name") for volume in self.volumes]
        reserved = sorted(RESERVED_VOLUMES.intersection(names))
        if reserved:
            raise ValueError(f"volumes: {', '.join(reserved)} is the operator's volume; name yours otherwise")
        unknown = sorted({str(mount.get("name")) for mount in self.volume_mounts} - set(names))
        if unknown:
            raise ValueError(f"volumeMounts: {', '.join(unknown)} names no volume of spec.volumes")
        taken = sorted(var.name for var in self.env if var.reserved())
        if taken:
            raise ValueError(f"env: {', '.join(taken)} is set by the operator (OTEL_SERVICE_NAME is the service's "
                             f"name; {ENV_PREFIX}* settings go in spec.settings)")
        return self

    def pod_replicas(self) -> int:
        """The Deployment's replicas. With autoscaling on, spec.replicas within [minReplicas, maxReplicas]: a
        service made without replicas (the chart leaves them to the autoscaler) starts at minReplicas, not at the
        CRD's default of 1 until the autoscaler's first decision."""
        if not self.autoscaling.enabled:
            return self.replicas
        return min(max(self.replicas, self.autoscaling.min_replicas), self.autoscaling.max_replicas)

    def server_settings(self) -> dict[str, Any]:
        """What `kvbuffer serve` reads from its config file: the CR's settings plus those the operator fixes."""
        fixed: dict[str, Any] = {"model": self.model, "engine": self.engine, "port": GRPC_PORT,
                                 "metrics_port": METRICS_PORT, "device": "cuda" if self.gpus_per_replica else "cpu"}
        if self.engine == "sglang":  # SGLang splits each replica's model over tensorParallelSize GPUs
            fixed["sglang"] = {**self.settings.get("sglang", {}), TENSOR_PARALLEL_SETTING: self.tensor_parallel_size}
        return {**self.settings, **fixed}


def _describe(exc: ValidationError, prefix: str) -> str:
    """One line per error: the field's path (as the user spelled it), what is wrong, and the value given."""
    lines = []
    for error in exc.errors():
        path = ".".join(str(part) for part in (prefix, *error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] != "value_error":
            message = f"{message} (got {error['input']!r})"
        lines.append(f"{path}: {message}")
    return "\n".join(lines)


def parse_spec(raw: dict[str, Any]) -> KVBufferServiceSpec:
    """The spec, checked as the server would check it; SpecError names every field that is wrong."""
    try:
        spec = KVBufferServiceSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_describe(exc, "spec")) from None
    fixed = sorted(OPERATOR_SETTINGS.intersection(spec.settings))
    if fixed:
        raise SpecError("\n".join(f"spec.settings.{name}: set by the operator, not per KVBufferService"
                                  for name in fixed))
    try:
        ServiceSettings.model_validate(spec.server_settings())  # not the constructor: no environment read
    except ValidationError as exc:
        raise SpecError(_describe(exc, "spec.settings")) from None
    return spec
