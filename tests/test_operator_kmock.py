"""The real operator (kopf, the kubernetes client) against kmock's emulated API: see tests/operator_emulator.py
for what the emulator does not check and which tests cover it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import kmock
import pytest
import pytest_asyncio
import yaml
from kvbuffer.operator import resource as r

from tests.operator_emulator import (
    CR,
    Cluster,
    Emulator,
    condition,
    declare_resources,
    running_operator,
    wait_for,
    write_kubeconfig,
)

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        declare_resources(emulator)
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", str(server.url))))
        yield Cluster(emulator)


def settings_of(cluster: Cluster, name: str) -> dict:
    config_map = cluster.object("v1/configmaps", r.config_map_name(name))
    return yaml.safe_load(config_map["data"][r.CONFIG_KEY])


async def test_create_renders_owned_objects_status_and_events(cluster: Cluster) -> None:
    name, uid = f"svc-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    buffer_size = 48 + uuid.uuid4().int % 16
    async with running_operator():
        await cluster.create(name, {"model": "embedded:tiny-qwen3-next", "replicas": 2,
                                    "settings": {"buffer_size": buffer_size, "chunk_size": 16}}, uid)
        deployment = await wait_for(lambda: cluster.object("apps/v1/deployments", name), "the Deployment")
        await wait_for(lambda: cluster.object("v1/services", f"{name}-headless"), "the headless Service")
        assert settings_of(cluster, name)["buffer_size"] == buffer_size
        assert deployment["spec"]["replicas"] == 2
        for resource, object_name in [("v1/configmaps", f"{name}-config"), ("apps/v1/deployments", name),
                                      ("v1/services", name), ("v1/services", f"{name}-headless")]:
            owners = cluster.object(resource, object_name)["metadata"]["ownerReferences"]
            assert owners == [{"apiVersion": r.API_VERSION, "kind": r.KIND, "name": name, "uid": uid,
                               "controller": True, "blockOwnerDeletion": True}]
        status = await wait_for(lambda: cluster.service(name)["status"].get("selector") and
                                cluster.service(name)["status"], "the status")
        assert status["observedGeneration"] == 1
        assert status["selector"] == r.selector_string(name)
        assert condition(cluster.service(name), "Degraded")["status"] == "False"
        await wait_for(lambda: len(cluster.events(name)) >= 4, "one Event per created object")
        assert {e["reason"] for e in cluster.events(name)} == {"Created"}

        await cluster.roll_out(name, ready=1)
        await wait_for(lambda: condition(cluster.service(name), "Ready")["reason"] == "PartiallyReady", "Ready=False")
        await cluster.roll_out(name)
        await wait_for(lambda: condition(cluster.service(name), "Ready")["status"] == "True", "Ready=True")
        assert cluster.service(name)["status"]["readyReplicas"] == 2
        assert condition(cluster.service(name), "Progressing")["status"] == "False"
