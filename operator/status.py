"""The status of a KVBufferService: its shape (the CRD's status schema is generated from these models) and the
pure rules that derive conditions from what the operator saw. Writers patch only the parts they own."""

from __future__ import annotations

import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

ConditionType = Literal["Ready", "Progressing", "ScalingActive", "MetricsAvailable", "Degraded"]
DECISION_HISTORY = 10  # decisions kept in status.autoscaling.decisions, newest last


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_Status):
    """Kubernetes' metav1.Condition."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="CamelCase reason of the last transition")
    message: str = Field("", description="what happened, for people")
    last_transition_time: str = Field(description="when status last changed (RFC 3339)")
    observed_generation: int | None = Field(None, description="metadata.generation the condition was set from")


class DecisionRecord(_Status):
    """One autoscaling decision that changed (or, when limited, held) the replica count."""

    time: str = Field(description="when it was taken (RFC 3339)")
    from_replicas: int = Field(description="replicas before")
    to_replicas: int = Field(description="replicas after")
    reason: str = Field(description="why, in the policy's words")
    inputs: dict[str, Any] = Field(default_factory=dict, description="the telemetry and estimates it used")


class AutoscalingStatus(_Status):
    desired_replicas: int | None = Field(None, description="the policy's last answer")
    last_decision_time: str | None = Field(None, description="when the policy last ran (RFC 3339)")
    last_scale_time: str | None = Field(None, description="when the replica count last changed (RFC 3339)")
    state: dict[str, Any] = Field(default_factory=dict, description="the policy's memory (windows, learned "
                                  "capacity), kept here so that it survives operator restarts")
    decisions: list[DecisionRecord] = Field(default_factory=list, description=f"the last {DECISION_HISTORY} "
                                            "decisions that changed the replica count, newest last")


class TelemetrySummary(_Status):
    """What the replicas reported at the last scrape: the fleet-wide numbers a decision used."""

    time: str | None = Field(None, description="when it was scraped (RFC 3339)")
    sampled_replicas: int = Field(0, description="ready replicas whose /metrics answered")
    buffered_share: str | None = Field(None, description="share of decoded tokens that wrote no state "
                                       "(stateless and buffered paths), as a percentage")
    values: dict[str, Any] = Field(default_factory=dict, description="decode rate by path, backlog, occupancy")


class KVBufferServiceStatus(_Status):
    observed_generation: int | None = Field(None, description="metadata.generation the operator last applied")
    replicas: int = Field(0, description="pods of the Deployment (scale subresource)")
    ready_replicas: int = Field(0, description="pods that pass their readiness probe")
    updated_replicas: int = Field(0, description="pods running the current settings")
    selector: str = Field("", description="label selector of the pods (scale subresource)")
    config_hash: str = Field("", description="hash of the settings the pods should run")
    conditions: list[Condition] = Field(default_factory=list)
    autoscaling: AutoscalingStatus = Field(default_factory=AutoscalingStatus)
    telemetry: TelemetrySummary = Field(default_factory=TelemetrySummary)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def set_condition(conditions: list[dict[str, Any]], type: ConditionType, status: bool | None, reason: str,
                  message: str = "", generation: int | None = None) -> list[dict[str, Any]]:
    """The conditions with `type` set; lastTransitionTime moves only when the status changes (API convention)."""
    value = "Unknown" if status is None else str(bool(status))
    old = next((c for c in conditions if c.get("type") == type), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value and "lastTransitionTime" in old else now()
    new = Condition(type=type, status=value, reason=reason, message=message, last_transition_time=since,
                    observed_generation=generation).model_dump(by_alias=True, exclude_none=True)
    if old is None:
        return [*conditions, new]
    return [new if c is old else c for c in conditions]


def rollout_conditions(deployment_status: dict[str, Any], deployment_generation: int | None,
                       wanted: int) -> list[tuple[ConditionType, bool, str, str]]:
    """Ready and Progressing from a Deployment's status: (type, status, reason, message) each.

    Ready: as many replicas are ready as are wanted (during a settings roll, old pods count: maxUnavailable 0
    keeps capacity while new pods start). Progressing: the Deployment has not yet
    caught up with its spec (new pods of a settings roll, or pods of a scale-up, not ready yet).
    """
    ready = deployment_status.get("readyReplicas") or 0
    updated = deployment_status.get("updatedReplicas") or 0
    total = deployment_status.get("replicas") or 0
    seen = deployment_status.get("observedGeneration")
    caught_up = seen is not None and deployment_generation is not None and seen >= deployment_generation
    rolled = caught_up and updated >= wanted and total <= wanted and ready >= wanted
    counts = f"{ready}/{wanted} ready, {updated} updated, {total} total"
    if rolled:
        progressing = (False, "RolloutComplete", f"every replica runs the current settings ({counts})")
    else:
        progressing = (True, "RollingOut", f"replicas are being updated or started ({counts})")
    if wanted == 0:
        ready_condition = (True, "ScaledToZero", "no replicas are wanted")
    elif ready >= wanted:
        ready_condition = (True, "AllReplicasReady", counts)
    elif ready > 0:
        ready_condition = (False, "PartiallyReady", counts)
    else:
        ready_condition = (False, "NoReplicaReady", counts)
    return [("Ready", *ready_condition), ("Progressing", *progressing)]
