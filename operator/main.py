"""`kvbuffer operator`: kopf's event loop with the handlers of kvbuffer.operator.handlers, peering, /healthz on
health_port and the operator's metrics on metrics_port."""

from __future__ import annotations

import asyncio
import logging
import random
import threading

import kopf
from kvbuffer.operator import handlers, metrics, peering
from kvbuffer.operator import resource as r
from kvbuffer.operator.cluster import api_client
from kvbuffer.operator.settings import OperatorSettings

FINALIZER = f"{r.GROUP}/operator"


def kopf_settings(options: OperatorSettings, clusterwide: bool) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.peering.name = options.peering
    settings.peering.clusterwide = clusterwide
    settings.peering.priority = options.priority if options.priority is not None else random.randrange(2**31)
    settings.peering.mandatory = not options.standalone
    settings.peering.standalone = options.standalone
    settings.scanning.disabled = True  # the CRD is installed by the chart: no need to watch CRDs or namespaces
    # kopf's own bookkeeping (annotations, and the finalizer its daemons need to stop before an object goes),
    # under the project's domain.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=r.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=r.GROUP)
    settings.persistence.finalizer = FINALIZER
    return settings


async def run(options: OperatorSettings, stop: asyncio.Event | threading.Event | None = None,
              ready: asyncio.Event | threading.Event | None = None) -> None:
    """Serve until `stop` is set (or the process is signalled); `ready` is set once it serves."""
    namespaces = options.namespaces()
    if not options.standalone:
        await asyncio.to_thread(peering.ensure, api_client(), namespaces, options.peering)
    await kopf.operator(
        registry=handlers.registry,
        settings=kopf_settings(options, clusterwide=namespaces is None),
        clusterwide=namespaces is None,
        namespaces=namespaces or (),
        standalone=options.standalone,
        liveness_endpoint=f"http://0.0.0.0:{options.health_port}/healthz",
        memo=kopf.Memo(retry_seconds=options.retry_seconds),
        stop_flag=stop,
        ready_flag=ready,
    )


def main(options: OperatorSettings) -> None:
    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics.serve(options.metrics_port)
    asyncio.run(run(options))
