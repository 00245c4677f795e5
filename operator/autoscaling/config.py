"""The `autoscaling` block of a KVBufferService: every knob of the policy, with its meaning and range.

The CRD's schema for `spec.autoscaling` is generated from `AutoscalingSpec.model_json_schema(by_alias=True)`,
so the descriptions and bounds here are what `kubectl explain` shows and what the API server enforces.
Kubernetes-level fields are camelCase; Python code may use either spelling (populate_by_name).
How the policy uses each knob: docs/AUTOSCALING.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

# Saturated decode throughput of one replica by decode path, tokens/s: docs/BENCHMARKS.md, engine table, B=256
# on an H100 (stateless 36196, buffered 26926, recurrent 24654), rounded. Only a starting point: the policy
# refines it online from the throughput it observes when replicas are saturated.
_PRIOR_TOKENS_PER_SECOND = {"stateless": 36000.0, "buffered": 27000.0, "recurrent": 24600.0}


class _CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class PathThroughput(_CamelModel):
    """Tokens per second one saturated replica decodes when all its tokens take one path."""

    stateless: float = Field(_PRIOR_TOKENS_PER_SECOND["stateless"], gt=0, le=1e9, description=
                             "tokens/s on the stateless path (context within buffer_size, no state held)")
    buffered: float = Field(_PRIOR_TOKENS_PER_SECOND["buffered"], gt=0, le=1e9, description=
                            "tokens/s on the buffered path (read-only checkpoint + buffer: KVBuffer)")
    recurrent: float = Field(_PRIOR_TOKENS_PER_SECOND["recurrent"], gt=0, le=1e9, description=
                             "tokens/s on the recurrent path (state read and written every step)")


def _cel_rules(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Cross-field rules as CEL (x-kubernetes-validations) in the generated schema; a field left out counts at its
    default. minReplicas <= maxReplicas is added by the CRD generator (kvbuffer.operator.crd)."""
    def term(name: str) -> str:
        alias = model.model_fields[name].alias
        return f"(has(self.{alias}) ? self.{alias} : {model.model_fields[name].default})"

    schema["x-kubernetes-validations"] = [
        {"rule": f"{term('panic_window_seconds')} <= {term('stable_window_seconds')}",
         "message": "panicWindowSeconds must be <= stableWindowSeconds", "fieldPath": ".panicWindowSeconds"}]


class AutoscalingSpec(_CamelModel):
    """How the operator sizes the fleet from the replicas' decode-path telemetry (docs/AUTOSCALING.md).

    Per decision the policy estimates each replica's capacity from the observed mix of decoded tokens by path
    and its slot occupancy, compares it with demand (decode rate plus backlog), and moves the replica count
    within [minReplicas, maxReplicas], damped by the tolerance, windows and rate limits below.
    """

    model_config = ConfigDict(json_schema_extra=_cel_rules)

    enabled: bool = Field(False, description="the operator sets the replica count; when false, spec.replicas "
                          "(or kubectl scale, an HPA or KEDA through the scale subresource) does")
    min_replicas: int = Field(1, ge=1, le=1000, description="fewest replicas, 1..1000")
    max_replicas: int = Field(4, ge=1, le=1000, description="most replicas, 1..1000, >= minReplicas")
    sync_period_seconds: float = Field(15.0, ge=1, le=300, description="seconds between two decisions "
                                       "(scrape, decide, apply), 1..300")
    target_utilization: float = Field(0.75, ge=0.1, le=1.0, description="share of each replica's estimated "
                                      "capacity (decode tokens/s and concurrent requests) the policy sizes the "
                                      "fleet for, 0.1..1; the rest is headroom for bursts")
    ttft_target_seconds: float = Field(2.0, gt=0, le=600, description="time-to-first-token objective, "
                                       "seconds: while the replicas' recent TTFT exceeds it with requests "
                                       "waiting, their throughput is taken as their capacity (learned) and the "
                                       "fleet is not scaled down; (0, 600]")
    tolerance: float = Field(0.1, ge=0, le=0.5, description="relative dead band: no change while the "
                             "replicas needed are within this fraction of the replicas there are, 0..0.5")
    stable_window_seconds: float = Field(60.0, ge=1, le=3600, description="demand is averaged over this many "
                                         "seconds for ordinary decisions, 1..3600")
    panic_window_seconds: float = Field(10.0, ge=1, le=600, description="short window for bursts: when its "
                                        "average demand needs panicThreshold times the replicas there are, "
                                        "the policy scales up from it at once and does not scale down until "
                                        "the burst has passed a whole stable window, 1..600 (<= "
                                        "stableWindowSeconds)")
    panic_threshold: float = Field(2.0, ge=1.1, le=10, description="replicas needed over the short window, "
                                   "divided by replicas there are, that starts panic mode, 1.1..10")
    scale_down_stabilization_seconds: float = Field(300.0, ge=0, le=3600, description="the replica count only "
                                                    "goes down to the highest recommendation of this many past "
                                                    "seconds, 0..3600")
    max_scale_up_rate: float = Field(2.0, ge=1, le=100, description="per decision the count grows at most to "
                                     "max(ceil(replicas x this), replicas + maxScaleUpPods), 1..100")
    max_scale_up_pods: int = Field(4, ge=1, le=1000, description="see maxScaleUpRate, 1..1000")
    max_scale_down_rate: float = Field(2.0, ge=1, le=100, description="per decision the count shrinks at most "
                                       "to replicas / this (always by at least one pod when it shrinks), 1..100")
    metrics_staleness_seconds: float = Field(60.0, ge=1, le=3600, description="a replica's metrics older than "
                                             "this count as missing: the fleet is then not scaled down and "
                                             "MetricsAvailable is False, 1..3600")
    path_tokens_per_second: PathThroughput = Field(default_factory=PathThroughput, description=
                                                   "prior saturated decode throughput of one replica by decode "
                                                   "path (default: docs/BENCHMARKS.md, H100); refined online")
    capacity_learning_rate: float = Field(0.3, ge=0, le=1, description="how far one saturated observation "
                                          "moves the learned per-path cost toward what it measured, 0..1 (0: "
                                          "keep the prior)")

    @model_validator(mode="after")
    def _consistent(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must be <= maxReplicas ({self.max_replicas})")
        if self.panic_window_seconds > self.stable_window_seconds:
            raise ValueError(f"panicWindowSeconds ({self.panic_window_seconds}) must be <= stableWindowSeconds "
                             f"({self.stable_window_seconds})")
        return self
