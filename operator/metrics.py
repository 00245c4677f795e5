"""The operator's own Prometheus metrics, served on METRICS_PORT (the dashboard imports the names from here)."""

from __future__ import annotations

import contextlib
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

METRICS_PORT = 9465
DESIRED_REPLICAS = "kvbuffer_operator_desired_replicas"
READY_REPLICAS = "kvbuffer_operator_ready_replicas"
SCALING_EVENTS = "kvbuffer_operator_scaling_events_total"
LABELS = ("namespace", "kvbufferservice")

REGISTRY = CollectorRegistry(auto_describe=True)
desired_replicas = Gauge(DESIRED_REPLICAS, "replicas a KVBufferService should have (spec.replicas)", LABELS,
                         registry=REGISTRY)
ready_replicas = Gauge(READY_REPLICAS, "ready replicas of a KVBufferService", LABELS, registry=REGISTRY)
# prometheus_client appends _total to a counter's name itself.
scaling_events = Counter(SCALING_EVENTS.removesuffix("_total"), "replica count changes the autoscaler made",
                         (*LABELS, "direction"), registry=REGISTRY)


def forget(namespace: str, name: str) -> None:
    """Drop a deleted KVBufferService's series, so a dashboard does not show it forever."""
    series = [(gauge, (namespace, name)) for gauge in (desired_replicas, ready_replicas)]
    series += [(scaling_events, (namespace, name, direction)) for direction in ("up", "down")]
    for metric, labels in series:
        with contextlib.suppress(KeyError):  # never set
            metric.remove(*labels)


def serve(port: int = METRICS_PORT) -> WSGIServer:
    """GET /metrics on `port` from a background thread; returns the server (its shutdown() stops it)."""
    server, _thread = start_http_server(port, registry=REGISTRY)
    return server
