"""The objects a KVBufferService should own, as a pure function of its name, uid and spec (no cluster needed).

A settings edit changes the ConfigMap and, through the config hash in the pod template, rolls the Deployment;
maxUnavailable 0 keeps every old pod serving until its replacement is ready. Probes speak grpc.health.v1, which
the server turns NOT_SERVING while it drains, so a terminating pod leaves the Services first.
"""

from __future__ import annotations

import copy
import hashlib
import math
from typing import Any

import yaml
from kvbuffer.operator import resource as r
from kvbuffer.operator.spec import KVBufferServiceSpec
from kvbuffer.service.server.settings import ServiceSettings

# Tensor-parallel ranks exchange tensors through /dev/shm (NCCL); 64 MiB, the default, is too small. The chart's
# server.shmSize defaults to the same (tests/test_helm_chart.py compares the two pods).
SHM_SIZE = "16Gi"
# On SIGTERM the server drains for shutdown_grace_period_s, then its engine (SGLang's processes) needs a moment to
# stop: the kubelet waits ceil(grace) + this before killing it, as the chart's server template does.
STOP_SECONDS = 15
DEFAULT_GRACE_S = ServiceSettings.model_fields["shutdown_grace_period_s"].default
STARTUP_SECONDS = 1800  # a large model takes minutes to load: the startup probe allows this long before restarts
USER_ID = 10001  # the images' user (Dockerfile)
HOME = "/home/kvbuffer"  # its home: Triton's and SGLang's caches
# The restricted Pod Security Standard, as the chart's pods run: a namespace that enforces it admits these pods.
# The root filesystem is read-only, so the caches and temporary files go to emptyDirs (SCRATCH).
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
SCRATCH = {"home": HOME, "tmp": "/tmp"}


def config_text(spec: KVBufferServiceSpec) -> str:
    return yaml.safe_dump(spec.server_settings(), sort_keys=True)


def config_hash(spec: KVBufferServiceSpec) -> str:
    return hashlib.sha256(config_text(spec).encode()).hexdigest()[:16]


def _metadata(name: str, namespace: str, owner: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": r.selector_labels(owner["name"]),
            "ownerReferences": [owner]}


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """The KVBufferService as controller of an object: deleting it deletes the object (garbage collection)."""
    return {"apiVersion": r.API_VERSION, "kind": r.KIND, "name": name, "uid": uid, "controller": True,
            "blockOwnerDeletion": True}


def config_map(name: str, namespace: str, uid: str, spec: KVBufferServiceSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(r.config_map_name(name), namespace, owner_reference(name, uid)),
            "data": {r.CONFIG_KEY: config_text(spec)}}


def _resources(spec: KVBufferServiceSpec) -> dict[str, Any]:
    """Quantities as strings: the kubernetes client refuses an integer quantity in a create body (`cpu: 4`, the
    GPU count), although the API server would take it."""
    limits = {name: str(quantity) for name, quantity in spec.resources.limits.items()}
    requests = {name: str(quantity) for name, quantity in spec.resources.requests.items()}
    if spec.gpus_per_replica:
        limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = str(spec.gpus_per_replica)
    return {key: value for key, value in (("limits", limits), ("requests", requests)) if value}


def _grpc_probe(period: int, failures: int) -> dict[str, Any]:
    return {"grpc": {"port": r.GRPC_PORT}, "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": 5}


def deployment(name: str, namespace: str, uid: str, spec: KVBufferServiceSpec) -> dict[str, Any]:
    labels = r.selector_labels(name)
    settings = spec.server_settings()
    grace = settings.get("shutdown_grace_period_s", DEFAULT_GRACE_S)
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": r.config_map_name(name)}},
                                     *({"name": volume, "emptyDir": {}} for volume in SCRATCH)]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": r.CONFIG_DIR, "readOnly": True},
                                    *({"name": volume, "mountPath": path} for volume, path in SCRATCH.items())]
    if spec.gpus_per_replica:  # SGLang's processes, and tensor-parallel ranks, share tensors through /dev/shm
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    volumes += copy.deepcopy(spec.volumes)
    mounts += copy.deepcopy(spec.volume_mounts)
    container = {
        "name": "server",
        "image": spec.image,
        "command": ["kvbuffer"],
        "args": ["serve", "--config", f"{r.CONFIG_DIR}/{r.CONFIG_KEY}"],
        "ports": [{"name": "grpc", "containerPort": r.GRPC_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": r.METRICS_PORT, "protocol": "TCP"}],
        "env": [{"name": "OTEL_SERVICE_NAME", "value": name},
                *(var.model_dump(by_alias=True, exclude_defaults=True) for var in spec.env)],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "startupProbe": _grpc_probe(10, STARTUP_SECONDS // 10),
        "readinessProbe": _grpc_probe(5, 2),
        "livenessProbe": _grpc_probe(10, 6),
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }
    template_annotations = {r.CONFIG_HASH_ANNOTATION: config_hash(spec), "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(r.METRICS_PORT)}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(name, namespace, owner_reference(name, uid)),
        "spec": {
            "replicas": spec.pod_replicas(),
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "revisionHistoryLimit": 5,
            "template": {
                "metadata": {"labels": labels, "annotations": template_annotations},
                "spec": {
                    "securityContext": copy.deepcopy(POD_SECURITY),
                    "enableServiceLinks": False,  # no variables per Service of the namespace in the environment
                    "containers": [container],
                    "volumes": volumes,
                    "terminationGracePeriodSeconds": math.ceil(grace) + STOP_SECONDS,
                    **({"nodeSelector": dict(spec.node_selector)} if spec.node_selector else {}),
                    **({"tolerations": copy.deepcopy(spec.tolerations)} if spec.tolerations else {}),
                },
            },
        },
    }


def _service(name: str, service_name: str, namespace: str, uid: str, headless: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": "ClusterIP",
        "selector": r.selector_labels(name),
        "ports": [{"name": "grpc", "port": r.GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                  {"name": "metrics", "port": r.METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
    }
    if headless:
        spec["clusterIP"] = "None"  # one DNS record per ready pod: clients that balance per connection use this
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(service_name, namespace, owner_reference(name, uid)), "spec": spec}


def desired_objects(name: str, namespace: str, uid: str, spec: KVBufferServiceSpec) -> list[dict[str, Any]]:
    """Everything one KVBufferService owns, in the order to apply it (the ConfigMap before the pods that read it)."""
    return [
        config_map(name, namespace, uid, spec),
        deployment(name, namespace, uid, spec),
        _service(name, name, namespace, uid, headless=False),
        _service(name, r.headless_service_name(name), namespace, uid, headless=True),
    ]
