"""Names the operator and the cluster agree on: the custom resource's API coordinates, the objects it owns per
KVBufferService and their labels and ports (CONTRACTS.md). Everything that spells one of them imports it here."""

from __future__ import annotations

GROUP = "serving.kvbuffer.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "KVBufferService"
PLURAL = "kvbufferservices"
SINGULAR = "kvbufferservice"
SHORT_NAMES = ("kvbs",)

MANAGER = "kvbuffer-operator"  # app.kubernetes.io/managed-by, the field manager, the event source
GRPC_PORT = 50051
METRICS_PORT = 9464
CONFIG_KEY = "settings.yaml"
CONFIG_DIR = "/etc/kvbuffer"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"
LAST_APPLIED_ANNOTATION = f"{GROUP}/last-applied"  # on each owned object: what the operator applied to it last


def config_map_name(name: str) -> str:
    return f"{name}-config"


def headless_service_name(name: str) -> str:
    return f"{name}-headless"


def selector_labels(name: str) -> dict[str, str]:
    """The labels every pod of one KVBufferService carries; the Deployment and Services select on them."""
    return {
        "app.kubernetes.io/name": "kvbuffer",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "server",
        "app.kubernetes.io/managed-by": MANAGER,
    }


def selector_string(name: str) -> str:
    """`status.selector` of the scale subresource: the label selector in its string form."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(name).items()))
