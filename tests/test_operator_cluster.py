"""Cluster (the operator's API calls, the official kubernetes client) against kmock's emulated API server:
get-create-patch converges and does nothing the second time, a key dropped from what it applies leaves the object
while keys another writer added stay, a status patch based on a stale read is refused
(409, as by the API server) and done again from a fresh read, the scale subresource moves spec.replicas."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio
from kvbuffer.operator import resource as r
from kvbuffer.operator.cluster import Cluster, api_client
from kvbuffer.operator.render import desired_objects
from kvbuffer.operator.spec import parse_spec
from kvbuffer.operator.status import set_condition
from operator_emulator import CR, emulated_api
from operator_emulator import Cluster as Api

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    async with emulated_api(tmp_path, monkeypatch) as emulated:
        yield emulated


async def call(function: Any, *args: Any) -> Any:
    """The client is synchronous, the emulator runs on this loop: call the client from a thread."""
    return await asyncio.to_thread(function, *args)


async def test_apply_creates_then_patches_then_leaves_alone(api: Api) -> None:
    cluster = Cluster(api_client())
    spec = parse_spec({"model": "m", "settings": {"chunk_size": random.randint(1, 64)}})
    objects = desired_objects("svc", "default", str(uuid.uuid4()), spec)
    assert [await call(cluster.apply, obj) for obj in objects] == ["created"] * 4
    assert [await call(cluster.apply, obj) for obj in objects] == ["unchanged"] * 4
    bigger = desired_objects("svc", "default", objects[0]["metadata"]["ownerReferences"][0]["uid"],
                             spec.model_copy(update={"replicas": 3}))
    assert [await call(cluster.apply, obj) for obj in bigger] == ["unchanged", "updated", "unchanged", "unchanged"]
    assert api.object("apps/v1/deployments", "svc")["spec"]["replicas"] == 3


def config_map(data: dict[str, str], labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cm", "namespace": "default", "labels": labels}, "data": data}


async def test_apply_drops_keys_it_no_longer_applies_and_keeps_other_writers_keys(api: Api) -> None:
    cluster = Cluster(api_client())
    data = {f"key-{index}": uuid.uuid4().hex for index in range(random.randint(2, 6))}
    labels = {f"example.com/label-{index}": uuid.uuid4().hex[:8] for index in range(random.randint(2, 6))}
    assert await call(cluster.apply, config_map(data, labels)) == "created"
    others = {"data": {"notes": uuid.uuid4().hex}, "metadata": {"labels": {"team": uuid.uuid4().hex[:8]}}}
    await api.patch("/api/v1/namespaces/default/configmaps/cm", others)  # another writer, e.g. kubectl
    kept_data = dict(random.sample(sorted(data.items()), random.randint(1, len(data) - 1)))
    kept_labels = dict(random.sample(sorted(labels.items()), random.randint(0, len(labels) - 1)))

    assert await call(cluster.apply, config_map(kept_data, kept_labels)) == "updated"
    obj = api.object("v1/configmaps", "cm")
    assert obj["data"] == {**kept_data, **others["data"]}
    assert obj["metadata"]["labels"] == {**kept_labels, **others["metadata"]["labels"]}
    assert await call(cluster.apply, config_map(kept_data, kept_labels)) == "unchanged"


async def test_status_patch_retries_after_a_conflict(api: Api) -> None:
    await api.create("svc", {"model": "m"}, str(uuid.uuid4()))
    cluster = Cluster(api_client())
    writes = []

    def change(status: dict[str, Any]) -> dict[str, Any]:
        writes.append(dict(status))
        if len(writes) == 1:  # another writer lands between this read and this patch
            api.emulator.objects[(kmock.resource(CR), "default", "svc")].patch(
                {"metadata": {"resourceVersion": "other-writer"},
                 "status": {"conditions": set_condition([], "Ready", True, "AllReplicasReady")}})
        return {"conditions": set_condition(status.get("conditions") or [], "Degraded", False, "Applied")}

    await call(cluster.patch_status, "svc", "default", change)
    assert len(writes) == 2  # read again after the 409
    types = {c["type"] for c in api.service("svc")["status"]["conditions"]}
    assert types == {"Ready", "Degraded"}  # the other writer's condition survived


async def test_scale_subresource_sets_spec_replicas(api: Api) -> None:
    await api.create("svc", {"model": "m", "replicas": 1}, str(uuid.uuid4()))
    replicas = random.randint(2, 9)
    await call(Cluster(api_client()).scale, "svc", "default", replicas)
    assert api.service("svc")["spec"]["replicas"] == replicas


async def test_ready_pods_are_told_from_starting_and_terminating_ones(api: Api) -> None:
    states = [random.choice(["ready", "starting", "terminating"]) for _ in range(8)]
    for index, state in enumerate(states):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"svc-{index}", "namespace": "default",
                                                               "labels": r.selector_labels("svc")},
               "spec": {"containers": [{"name": "server", "image": "kvbuffer"}]},
               "status": {"phase": "Running", "podIP": f"10.0.0.{index}",
                          "conditions": [{"type": "Ready", "status": str(state == "ready")}]}}
        if state == "terminating":
            pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        response = await api.emulator.post("/api/v1/namespaces/default/pods", json=pod)
        assert response.status < 300
    ready = await call(Cluster(api_client()).ready_pods, "svc", "default")
    assert sorted(p["metadata"]["name"] for p in ready) == [f"svc-{i}" for i, s in enumerate(states) if s == "ready"]
