"""The autoscaling loop end to end: the real operator (kopf daemon) scrapes real `kvbuffer serve` replicas (the
embedded model on loopback, registered as the pods of the emulated API), benchmarks/load_test.py drives load,
and the decisions follow: scale-up under load, recorded with its reason and inputs, as an Event and in the
operator's metrics; the policy's state survives an operator restart; a replica whose metrics go missing sets
MetricsAvailable=False and never causes a scale-down.

The policy itself is tested from tables by its own module's tests; here the per-path throughput prior is set
tiny so that the CPU replicas' real decode rate is "more than one replica can take" (the tiny model on a CPU is
far below an H100's tokens/s, the prior's default).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kvbuffer.operator import metrics
from kvbuffer.operator import resource as r
from operator_emulator import (
    NAMESPACE,
    Cluster,
    condition,
    emulated_api,
    operator_calls,
    rbac_allowed,
    running_operator,
    wait_for,
)
from service_harness import RunningServer

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parents[1]
AUTOSCALING = {"enabled": True, "minReplicas": 1, "maxReplicas": 4, "syncPeriodSeconds": 1,
               "stableWindowSeconds": 5, "panicWindowSeconds": 2, "metricsStalenessSeconds": 3,
               "pathTokensPerSecond": {"stateless": 1, "buffered": 1, "recurrent": 1}}


@pytest_asyncio.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    async with emulated_api(tmp_path, monkeypatch) as emulated:
        yield emulated


@pytest.fixture
def replicas() -> Any:
    servers = [RunningServer(max_running_requests=8, max_waiting_requests=16) for _ in range(2)]
    yield servers
    for server in servers:  # those the test has not stopped
        server.stop()


async def register_pod(api: Cluster, name: str, index: int, server: RunningServer) -> None:
    """A ready pod of `name` whose metrics port is the real replica's."""
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{name}-{index}", "namespace": NAMESPACE, "labels": r.selector_labels(name)},
           "spec": {"containers": [{"name": "server", "image": "kvbuffer",
                                    "ports": [{"name": "metrics", "containerPort": server.server.metrics_port}]}]},
           "status": {"phase": "Running", "podIP": "127.0.0.1",
                      "conditions": [{"type": "Ready", "status": "True"}]}}
    response = await api.emulator.post(f"/api/v1/namespaces/{NAMESPACE}/pods", json=pod)
    assert response.status < 300


def load(server: RunningServer, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--target", server.target,
                             "--clients", "6", "--duration", str(seconds), "--max-new-tokens", "48"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def decisions(api: Cluster, name: str) -> list[dict[str, Any]]:
    return api.service(name)["status"].get("autoscaling", {}).get("decisions", [])


async def test_decisions_follow_the_load_and_survive_a_restart(api: Cluster, replicas: list[RunningServer]) -> None:
    name = "fleet"
    await api.create(name, {"model": "embedded:tiny-qwen3-next", "replicas": 2, "autoscaling": AUTOSCALING},
                     "7d1e5b2a-0000-4000-8000-000000000001")
    for index, server in enumerate(replicas):
        await register_pod(api, name, index, server)
    async with running_operator():
        await wait_for(lambda: condition(api.service(name), "MetricsAvailable")["status"] == "True",
                       "fresh metrics from both replicas (two scrapes each: rates)")
        assert api.service(name)["spec"]["replicas"] == 2  # idle: nothing to scale up for, too young to go down
        drivers = [load(server, 10) for server in replicas]
        try:
            await wait_for(lambda: api.service(name)["spec"]["replicas"] > 2, "a scale-up under load")
        finally:
            outputs = [driver.communicate(timeout=120)[0] for driver in drivers]
        assert all(driver.returncode == 0 for driver in drivers), outputs
        up = (await wait_for(lambda: decisions(api, name), "the decision in status"))[-1]
        assert up["fromReplicas"] == 2 and up["toReplicas"] == api.service(name)["spec"]["replicas"] <= 4
        assert up["reason"] in ("ScaleUp", "PanicScaleUp")
        assert sum(up["inputs"]["decodeTokensPerS"].values()) > 0  # it saw the replicas decode
        await wait_for(lambda: api.object("apps/v1/deployments", name)["spec"]["replicas"] == up["toReplicas"],
                       "the Deployment follows spec.replicas")
        await wait_for(lambda: up["reason"] in [e["reason"] for e in api.events(name)], "an Event for the scale-up")
        assert metrics.REGISTRY.get_sample_value(metrics.SCALING_EVENTS, {
            "namespace": NAMESPACE, "kvbufferservice": name, "direction": "up"}) >= 1
        state = api.service(name)["status"]["autoscaling"]["state"]

    scaled = api.service(name)["spec"]["replicas"]
    async with running_operator():  # restart: the state comes back from status, not from scratch
        await wait_for(lambda: api.service(name)["status"]["autoscaling"]["lastDecisionTime"] is not None
                       and api.service(name)["status"]["autoscaling"]["state"] != state, "a decision after restart")
        assert api.service(name)["status"]["autoscaling"]["state"]["since"] == state["since"]
        assert up in decisions(api, name)

        # After a restart the first scrape of each replica has no rates yet (MetricsAvailable=False for that
        # reason): wait for rates before stopping a replica so the False below is the stopped replica's.
        await wait_for(lambda: condition(api.service(name), "MetricsAvailable")["status"] == "True",
                       "rates from both replicas again after the restart")
        replicas.pop().stop()  # its metrics go missing: no scale-down on their account
        stale = await wait_for(lambda: (c := condition(api.service(name), "MetricsAvailable"))["status"] == "False"
                               and c, "MetricsAvailable=False once the replica's metrics are stale")
        assert "no fresh metrics" in stale["message"]
        await asyncio.sleep(2 * AUTOSCALING["syncPeriodSeconds"])  # a few more rounds without its metrics
        assert api.service(name)["spec"]["replicas"] >= scaled
    assert ("serving.kvbuffer.io", "kvbufferservices/scale", "patch") in operator_calls(api.emulator)
    assert operator_calls(api.emulator) <= rbac_allowed()
