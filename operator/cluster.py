"""The operator's calls to the API server, through the official kubernetes client (synchronous: kopf runs sync
handlers in its thread pool): idempotent get-create-patch of owned objects, status patches that do not lose a
concurrent writer's conditions, and the replica count through the scale subresource.

Owned objects are patched as kubectl's client-side apply does: each carries what the operator applied to it last
(an annotation), and the merge patch sets to null every map key in that record that the operator no longer
applies, so a key dropped from the spec leaves the object while keys other writers added stay. Server-side apply
would do the same with field managers, but kmock, the API emulator the tests run the operator against, applies
every patch as a plain merge patch and keeps no managedFields: the tests could not exercise it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any, Literal

import kubernetes
from kubernetes.client.exceptions import ApiException
from kvbuffer.operator import resource as r

log = logging.getLogger(__name__)
MERGE_PATCH = "application/merge-patch+json"  # RFC 7386: lists we own (containers, ports) are replaced whole
STATUS_RETRIES = 5
Outcome = Literal["created", "updated", "unchanged"]


def api_client() -> kubernetes.client.ApiClient:
    """In a pod: its service account; elsewhere: $KUBECONFIG (read now, not at import) or ~/.kube/config."""
    try:
        kubernetes.config.load_incluster_config()
        return kubernetes.client.ApiClient()
    except kubernetes.config.ConfigException:
        return kubernetes.config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))


def contains(current: Any, desired: Any) -> bool:
    """Whether `current` already has every field of `desired` (fields the server added do not count as changes)."""
    if isinstance(desired, dict):
        return isinstance(current, dict) and all(contains(current.get(key), value) for key, value in desired.items())
    if isinstance(desired, list):
        return (isinstance(current, list) and len(current) == len(desired)
                and all(contains(c, d) for c, d in zip(current, desired, strict=True)))
    if isinstance(desired, bool) or isinstance(current, bool):
        return desired == current
    if isinstance(desired, int | float) and isinstance(current, int | float | str):
        return str(desired) == str(current)  # a quantity given as a number comes back as a string
    return desired == current


def recorded(desired: dict[str, Any]) -> dict[str, Any]:
    """`desired` carrying itself in its last-applied annotation, for the next apply to know which keys were ours."""
    metadata = desired["metadata"]
    record = json.dumps(desired, sort_keys=True, separators=(",", ":"))
    annotations = {**metadata.get("annotations", {}), r.LAST_APPLIED_ANNOTATION: record}
    return {**desired, "metadata": {**metadata, "annotations": annotations}}


def last_applied(current: dict[str, Any]) -> dict[str, Any]:
    """The record `recorded` left on an object; empty on one made before the operator kept it."""
    record = (current["metadata"].get("annotations") or {}).get(r.LAST_APPLIED_ANNOTATION)
    return json.loads(record) if record else {}


def patch_from(last: Any, desired: Any) -> Any:
    """The RFC 7386 patch from what was applied `last` to `desired`: `desired`, plus null for each key `last` had
    and `desired` has not; a map gone from `desired` loses only the keys `last` had, so keys other writers added
    (in neither) stay, as under server-side apply. Lists are replaced whole: they need no nulls."""
    if not isinstance(desired, dict):
        return desired
    last = last if isinstance(last, dict) else {}
    gone = {key: patch_from(value, {}) if isinstance(value, dict) else None
            for key, value in last.items() if key not in desired}
    return {**gone, **{key: patch_from(last.get(key), value) for key, value in desired.items()}}


class Cluster:
    """One API connection; every method is safe to repeat (a restart at any point converges)."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    def _verbs(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
        return {
            "ConfigMap": (self.core.read_namespaced_config_map, self.core.create_namespaced_config_map,
                          self.core.patch_namespaced_config_map),
            "Service": (self.core.read_namespaced_service, self.core.create_namespaced_service,
                        self.core.patch_namespaced_service),
            "Deployment": (self.apps.read_namespaced_deployment, self.apps.create_namespaced_deployment,
                           self.apps.patch_namespaced_deployment),
        }[kind]

    def _plain(self, obj: Any) -> dict[str, Any]:
        return self.client.sanitize_for_serialization(obj)

    def read(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        read, _, _ = self._verbs(kind)
        try:
            return self._plain(read(name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def apply(self, desired: dict[str, Any]) -> Outcome:
        """Create the object, or patch it to `desired` (dropping the keys applied before and no longer); nothing
        when it has every field of `desired` and the record of it."""
        kind, name, namespace = desired["kind"], desired["metadata"]["name"], desired["metadata"]["namespace"]
        _, create, patch = self._verbs(kind)
        desired = recorded(desired)
        current = self.read(kind, name, namespace)
        if current is None:
            try:
                create(namespace, desired, field_manager=r.MANAGER)
                return "created"
            except ApiException as exc:
                if exc.status != 409:  # 409: created meanwhile (another attempt of ours): patch it below
                    raise
                current = self.read(kind, name, namespace)
        if current is not None and contains(current, desired):
            return "unchanged"
        last = last_applied(current) if current is not None else {}
        patch(name, namespace, patch_from(last, desired), field_manager=r.MANAGER, _content_type=MERGE_PATCH)
        return "updated"

    def read_service(self, name: str, namespace: str) -> dict[str, Any] | None:
        """The KVBufferService, or None when it is gone."""
        try:
            return self.custom.get_namespaced_custom_object(r.GROUP, r.VERSION, namespace, r.PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_status(self, name: str, namespace: str,
                     change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any] | None:
        """Read the status, let `change` return the fields to set, patch them with the read resourceVersion.

        Conditions are a list, which a merge patch replaces whole: the resourceVersion makes a write based on a
        stale read fail (409) instead of dropping another writer's condition, and the read-change-patch repeats.
        Returns the patch, or None when the object is gone.
        """
        for _ in range(STATUS_RETRIES):
            current = self.read_service(name, namespace)
            if current is None:
                return None
            fields = change(current.get("status") or {})
            if contains(current.get("status") or {}, fields):
                return fields
            body = {"metadata": {"resourceVersion": current["metadata"].get("resourceVersion")}, "status": fields}
            try:
                self.custom.patch_namespaced_custom_object_status(
                    r.GROUP, r.VERSION, namespace, r.PLURAL, name, body, field_manager=r.MANAGER,
                    _content_type=MERGE_PATCH)
                return fields
            except ApiException as exc:
                if exc.status == 404:
                    return None
                if exc.status != 409:
                    raise
                log.debug("status of %s/%s changed meanwhile; reading it again", namespace, name)
        raise RuntimeError(f"status of {namespace}/{name} kept changing: {STATUS_RETRIES} attempts conflicted")

    def scale(self, name: str, namespace: str, replicas: int) -> None:
        """Set spec.replicas through the scale subresource, as an HPA would (one path to the Deployment)."""
        self.custom.patch_namespaced_custom_object_scale(
            r.GROUP, r.VERSION, namespace, r.PLURAL, name, {"spec": {"replicas": replicas}},
            field_manager=r.MANAGER, _content_type=MERGE_PATCH)

    def ready_pods(self, name: str, namespace: str) -> list[dict[str, Any]]:
        """The pods of a KVBufferService that pass their readiness probe and are not terminating."""
        pods = self.core.list_namespaced_pod(namespace, label_selector=r.selector_string(name)).items
        return [pod for pod in map(self._plain, pods) if not pod["metadata"].get("deletionTimestamp")
                and any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in (pod.get("status") or {}).get("conditions") or [])]
