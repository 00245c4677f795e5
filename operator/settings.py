"""Settings of `kvbuffer operator` (flags and KVBUFFER_OPERATOR_* variables, generated like `kvbuffer serve`'s)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from kvbuffer.operator import metrics
from kvbuffer.operator import resource as r
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "KVBUFFER_OPERATOR_"
POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    namespace: list[str] = Field([], description="namespace whose KVBufferServices to serve "
                                 "(repeat for several); default: the operator pod's own, else 'default'")
    all_namespaces: bool = Field(False, description="serve every namespace (needs a ClusterRole)")
    standalone: bool = Field(False, description="run without peering (leader election): only for a single "
                             "operator replica")
    peering: str = Field(r.MANAGER, min_length=1, description="name of the kopf peering object the operator "
                         "replicas elect their leader through (created at start if missing)")
    priority: int | None = Field(None, ge=0, le=2**31 - 1, description="this replica's peering priority, highest "
                                 "leads; default: random, so that replicas never tie")
    health_port: int = Field(8080, ge=1, le=65535, description="HTTP port of /healthz for the liveness probe")
    metrics_port: int = Field(metrics.METRICS_PORT, ge=1, le=65535, description="HTTP port of the operator's "
                              "Prometheus /metrics")
    retry_seconds: float = Field(10.0, gt=0, le=600, description="seconds before a spec whose apply failed (API "
                                 "error) is applied again")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log verbosity")

    @model_validator(mode="after")
    def _one_scope(self) -> OperatorSettings:
        if self.all_namespaces and self.namespace:
            raise ValueError("namespace and all_namespaces exclude each other")
        return self

    def namespaces(self) -> list[str] | None:
        """The namespaces to serve; None for all of them."""
        if self.all_namespaces:
            return None
        if self.namespace:
            return list(self.namespace)
        own = POD_NAMESPACE_FILE.read_text().strip() if POD_NAMESPACE_FILE.is_file() else ""
        return [own or "default"]
