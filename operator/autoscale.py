"""The autoscaling loop of one KVBufferService, between kopf and the policy (kvbuffer.operator.autoscaling).

Each round: list the pods, scrape every ready one's /metrics, hand the observation and the state kept in status
to the pure policy, apply its decision through the scale subresource, and record decision, telemetry and
conditions in status. With autoscaling off it still scrapes and asks the policy, so the status shows the
telemetry and what the policy would do, but nothing is applied and the policy's state is not kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf
from kvbuffer.operator import metrics
from kvbuffer.operator import resource as r
from kvbuffer.operator.autoscaling.config import AutoscalingSpec
from kvbuffer.operator.autoscaling.policy import Decision, PolicyState, decide
from kvbuffer.operator.autoscaling.telemetry import FleetScraper
from kvbuffer.operator.cluster import Cluster
from kvbuffer.operator.status import DECISION_HISTORY, now, set_condition
from pydantic import ValidationError


def metrics_url(pod: Mapping[str, Any]) -> str | None:
    """http://POD_IP:PORT/metrics, PORT the container port named `metrics`; None while the pod has no IP."""
    ip = (pod.get("status") or {}).get("podIP")
    ports = [port for container in pod.get("spec", {}).get("containers", [])
             for port in container.get("ports") or [] if port.get("name") == "metrics"]
    if not ip:
        return None
    return f"http://{ip}:{ports[0]['containerPort'] if ports else r.METRICS_PORT}/metrics"


def record(status: dict[str, Any], decision: Decision, enabled: bool, generation: int | None) -> dict[str, Any]:
    """The status fields one round sets (a pure function of the old status and the decision)."""
    conditions = status.get("conditions") or []
    conditions = set_condition(conditions, "MetricsAvailable", decision.metrics_available,
                               "MetricsFresh" if decision.metrics_available else "MetricsMissing",
                               decision.metrics_message, generation)
    if enabled:
        conditions = set_condition(conditions, "ScalingActive", True, decision.reason, decision.message, generation)
    else:
        conditions = set_condition(conditions, "ScalingActive", False, "AutoscalingDisabled",
                                   f"spec.autoscaling.enabled is false; the policy would say: {decision.message}",
                                   generation)
    summary = decision.summary.to_status() if decision.summary else {}
    share = summary.get("bufferedShare")
    telemetry = {"time": now(), "sampledReplicas": summary.get("freshReplicas", 0),
                 "bufferedShare": None if share is None else f"{100 * share:.0f}%", "values": summary}
    fields: dict[str, Any] = {"conditions": conditions, "telemetry": telemetry}
    if enabled:
        autoscaling = dict(status.get("autoscaling") or {})
        decisions = list(autoscaling.get("decisions") or [])
        autoscaling.update(desiredReplicas=decision.replicas, lastDecisionTime=now(),
                           state=decision.state.to_status())
        if decision.direction is not None:
            decisions.append({"time": now(), "fromReplicas": decision.current, "toReplicas": decision.replicas,
                              "reason": decision.reason, "inputs": {"message": decision.message, **summary}})
            autoscaling["lastScaleTime"] = now()
        autoscaling["decisions"] = decisions[-DECISION_HISTORY:]
        fields["autoscaling"] = autoscaling
    return fields


async def step(cluster: Cluster, scrapers: dict[tuple[str, str], FleetScraper], name: str, namespace: str,
               body: kopf.Body, logger: logging.Logger) -> float:
    """One round; returns the seconds until the next (the CR's syncPeriodSeconds)."""
    try:
        spec = AutoscalingSpec.model_validate(body.spec.get("autoscaling") or {})
    except ValidationError:
        return AutoscalingSpec().sync_period_seconds  # the spec handler reports it (Degraded); retry later
    replicas = body.spec.get("replicas", 1)
    pods = await asyncio.to_thread(cluster.ready_pods, name, namespace)  # the others count as starting
    endpoints = {pod["metadata"]["name"]: url for pod in pods if (url := metrics_url(pod))}
    scraper = scrapers.setdefault((namespace, name), FleetScraper())
    observation = await asyncio.to_thread(scraper.observe, endpoints, replicas)
    status = body.status.get("autoscaling") or {}
    decision = decide(spec, observation, PolicyState.from_status(status.get("state")), time.time())
    if spec.enabled:
        logger.info("autoscaling %s: %s", decision.reason, decision.message)  # one line per decision
    if spec.enabled and decision.direction is not None:
        await asyncio.to_thread(cluster.scale, name, namespace, decision.replicas)
        kopf.info(body, reason=decision.reason, message=decision.message)
        metrics.scaling_events.labels(namespace, name, decision.direction).inc()
        metrics.desired_replicas.labels(namespace, name).set(decision.replicas)
    generation = body.metadata.get("generation")
    await asyncio.to_thread(cluster.patch_status, name, namespace,
                            lambda old: record(old, decision, spec.enabled, generation))
    return spec.sync_period_seconds
