"""kopf handlers: thin. Each reads what kopf hands it, calls the module that decides or applies, reports.

- spec created / changed / seen at start-up -> reconcile (render, get-create-patch, status, one Event per change);
- a Deployment we own changed -> replicas and Ready/Progressing in the owner's status (deleted -> made again);
- per KVBufferService, a daemon runs the autoscaling loop (kvbuffer.operator.autoscale).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from kvbuffer.operator import autoscale, metrics
from kvbuffer.operator import resource as r
from kvbuffer.operator.autoscaling.config import AutoscalingSpec
from kvbuffer.operator.cluster import Cluster, api_client
from kvbuffer.operator.reconcile import reconcile, record_failure
from kvbuffer.operator.spec import SpecError
from kvbuffer.operator.status import rollout_conditions, set_condition

registry = kopf.OperatorRegistry()
_CR = (r.GROUP, r.VERSION, r.PLURAL)
_OWNED = {"app.kubernetes.io/managed-by": r.MANAGER}


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The same credentials as the kubernetes client's (cluster.api_client): service account, else $KUBECONFIG."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup(registry=registry)
def connect(memo: kopf.Memo, **_: Any) -> None:
    memo.cluster = Cluster(api_client())
    memo.scrapers = {}  # (namespace, name) -> FleetScraper: the previous samples that rates need


@kopf.on.resume(*_CR, registry=registry)
@kopf.on.create(*_CR, registry=registry)
@kopf.on.update(*_CR, registry=registry)
def apply_spec(name: str, namespace: str, uid: str, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status,
               body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    cluster: Cluster = memo.cluster
    generation = meta.get("generation")
    try:
        changes = reconcile(cluster, name, namespace, uid, generation, dict(spec), status.get("configHash"))
    except SpecError as exc:
        message = f"spec refused, the pods keep their settings: {exc}".replace("\n", "; ")
        logger.warning(message)
        record_failure(cluster, name, namespace, generation, "InvalidSpec", message)
        kopf.warn(body, reason="InvalidSpec", message=message)
        return  # nothing to retry: the next edit is handled as it comes
    except ApiException as exc:
        message = f"applying the spec failed: {exc.status} {exc.reason}; retrying in {memo.retry_seconds:g}s"
        logger.warning(message)
        with contextlib.suppress(ApiException):  # the API may still be failing: the retry reports again
            record_failure(cluster, name, namespace, generation, "ApplyFailed", message)
        raise kopf.TemporaryError(message, delay=memo.retry_seconds) from None
    for change in changes:
        message = change.describe()
        logger.info(message)
        kopf.info(body, reason=change.outcome.capitalize(), message=message)
    metrics.desired_replicas.labels(namespace, name).set(spec.get("replicas", 1))


@kopf.on.delete(*_CR, registry=registry, optional=True)
def forget(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """The owned objects go by garbage collection (owner references); only the metric series remain to drop."""
    metrics.forget(namespace, name)
    memo.scrapers.pop((namespace, name), None)


@kopf.on.event("apps", "v1", "deployments", labels=_OWNED, registry=registry)
def deployment_changed(type: str, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    owner = body.metadata.labels.get("app.kubernetes.io/instance")
    if owner is None:
        return
    namespace = body.metadata.namespace
    cluster: Cluster = memo.cluster
    if type == "DELETED":  # deleted by hand: make it again, unless its owner is going away too
        service = cluster.read_service(owner, namespace)
        if service is not None and not service["metadata"].get("deletionTimestamp"):
            logger.info("Deployment %s was deleted; applying %s again", body.metadata.name, owner)
            try:
                reconcile(cluster, owner, namespace, service["metadata"]["uid"],
                          service["metadata"].get("generation"), service["spec"],
                          (service.get("status") or {}).get("configHash"))
            except SpecError as exc:  # already reported as Degraded when the spec was edited
                logger.warning("cannot apply %s again: %s", owner, exc)
        return
    deployment_status = dict(body.status)
    wanted = body.spec.get("replicas", 1)
    conditions = rollout_conditions(deployment_status, body.metadata.get("generation"), wanted)

    def change(status: dict[str, Any]) -> dict[str, Any]:
        merged = status.get("conditions") or []
        for condition in conditions:
            merged = set_condition(merged, *condition, status.get("observedGeneration"))
        return {"replicas": deployment_status.get("replicas") or 0,
                "readyReplicas": deployment_status.get("readyReplicas") or 0,
                "updatedReplicas": deployment_status.get("updatedReplicas") or 0, "conditions": merged}

    if cluster.patch_status(owner, namespace, change) is not None:
        metrics.ready_replicas.labels(namespace, owner).set(deployment_status.get("readyReplicas") or 0)


@kopf.daemon(*_CR, registry=registry, cancellation_timeout=10)
async def autoscaling_loop(name: str, namespace: str, body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                           logger: logging.Logger, **_: Any) -> None:
    """Every syncPeriodSeconds: scrape the ready replicas, decide, apply (kvbuffer.operator.autoscale)."""
    period = AutoscalingSpec().sync_period_seconds
    while not stopped:
        try:
            period = await autoscale.step(memo.cluster, memo.scrapers, name, namespace, body, logger)
        except ApiException as exc:  # the next round tries again; the replica count stays as it is
            logger.warning("autoscaling round failed: %s %s", exc.status, exc.reason)
        await stopped.wait(period)
