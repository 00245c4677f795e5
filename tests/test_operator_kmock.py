"""The real operator (kopf's event loop, the official kubernetes client) against kmock's emulated API server.

What the emulator does not check (admission, strategic merge, the Deployment controller, garbage collection) is
listed in tests/operator_emulator.py with the tests that cover each gap.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_asyncio
import yaml
from kvbuffer.operator import metrics, peering
from kvbuffer.operator import resource as r
from operator_emulator import (
    Cluster,
    condition,
    emulated_api,
    running_operator,
    wait_for,
)

pytestmark = pytest.mark.asyncio
OWNED = [("v1/configmaps", "{}-config"), ("apps/v1/deployments", "{}"), ("v1/services", "{}"),
         ("v1/services", "{}-headless")]


@pytest_asyncio.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    async with emulated_api(tmp_path, monkeypatch) as api:
        yield api


def fresh() -> tuple[str, str]:
    return f"svc-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())


def served_settings(cluster: Cluster, name: str) -> dict[str, Any]:
    return yaml.safe_load(cluster.object("v1/configmaps", r.config_map_name(name))["data"][r.CONFIG_KEY])


def template_hash(cluster: Cluster, name: str) -> str:
    deployment = cluster.object("apps/v1/deployments", name)
    return deployment["spec"]["template"]["metadata"]["annotations"][r.CONFIG_HASH_ANNOTATION]


def reasons(cluster: Cluster, name: str) -> list[str]:
    return [event["reason"] for event in cluster.events(name)]


def messages(cluster: Cluster, name: str) -> set[str]:
    """Event messages without the object's name: 'updated ConfigMap', ..."""
    return {event["message"].split(f" {name}")[0] for event in cluster.events(name)}


async def applied(cluster: Cluster, name: str, generation: int) -> dict[str, Any]:
    """The status once the operator has applied `generation` (and its daemon has reported once)."""
    return await wait_for(lambda: cluster.service(name)["status"].get("observedGeneration") == generation
                          and condition(cluster.service(name), "MetricsAvailable")
                          and cluster.service(name)["status"], f"generation {generation} applied")


async def test_create_renders_owned_objects_status_and_events(cluster: Cluster) -> None:
    name, uid = fresh()
    buffer_size = 48 + uuid.uuid4().int % 16
    async with running_operator():
        await cluster.create(name, {"model": "embedded:tiny-qwen3-next", "replicas": 2,
                                    "settings": {"buffer_size": buffer_size, "chunk_size": 16}}, uid)
        status = await applied(cluster, name, 1)
        assert served_settings(cluster, name)["buffer_size"] == buffer_size
        assert cluster.object("apps/v1/deployments", name)["spec"]["replicas"] == 2
        for resource, pattern in OWNED:
            owners = cluster.object(resource, pattern.format(name))["metadata"]["ownerReferences"]
            assert owners == [{"apiVersion": r.API_VERSION, "kind": r.KIND, "name": name, "uid": uid,
                               "controller": True, "blockOwnerDeletion": True}]
        assert status["selector"] == r.selector_string(name)
        assert condition(cluster.service(name), "Degraded")["status"] == "False"
        assert condition(cluster.service(name), "MetricsAvailable")["status"] == "False"  # no pod is ready
        assert condition(cluster.service(name), "ScalingActive")["reason"] == "AutoscalingDisabled"
        await wait_for(lambda: reasons(cluster, name).count("Created") == 4, "one Event per created object")

        await cluster.roll_out(name, ready=1)
        await wait_for(lambda: condition(cluster.service(name), "Ready")["reason"] == "PartiallyReady", "Ready=False")
        await cluster.roll_out(name)
        await wait_for(lambda: condition(cluster.service(name), "Ready")["status"] == "True", "Ready=True")
        assert cluster.service(name)["status"]["readyReplicas"] == 2
        assert condition(cluster.service(name), "Progressing")["status"] == "False"
        sample = metrics.REGISTRY.get_sample_value(metrics.READY_REPLICAS, {"namespace": "default",
                                                                            "kvbufferservice": name})
        assert sample == 2


def deployment_replicas_written(cluster: Cluster, name: str) -> list[int]:
    """spec.replicas of each create and patch of the Deployment `name` that set it, in the order the API got them."""
    writes = [request.data for request in cluster.emulator
              if request.resource is not None and request.resource.plural == "deployments"
              and request.method.value in ("POST", "PATCH") and not request.subresource
              and (request.name or request.data["metadata"]["name"]) == name]
    return [data["spec"]["replicas"] for data in writes if "replicas" in data.get("spec", {})]


async def test_an_autoscaled_service_made_without_replicas_runs_min_replicas_from_its_first_pods(
        cluster: Cluster) -> None:
    """The chart leaves spec.replicas of an autoscaled service out (the autoscaler owns it): its Deployment starts
    at minReplicas on its own, not at the default of 1 until the autoscaler's first decision lands (here that
    decision cannot land: every scale request fails, as under an API outage or missing RBAC)."""
    name, uid = fresh()
    low = random.randint(2, 5)
    high = low + random.randint(0, 3)
    cluster.emulator.fail("PATCH", f"/{name}/scale", times=1000)
    async with running_operator():
        await cluster.create(name, {"model": "m", "autoscaling": {"enabled": True, "minReplicas": low,
                                                                 "maxReplicas": high}}, uid)
        await wait_for(lambda: cluster.emulator.failures[0][2] < 1000, "the autoscaler's (failed) scale request")
        # A label edit: a watch event for kopf, which handles the new object at its next one (the failed scale
        # request wrote nothing to give it one).
        await cluster.patch(f"/apis/{r.API_VERSION}/namespaces/default/{r.PLURAL}/{name}",
                            {"metadata": {"labels": {"team": uuid.uuid4().hex[:8]}}})
        await wait_for(lambda: cluster.service(name)["status"]["observedGeneration"] == 1
                       and condition(cluster.service(name), "Degraded")["status"] == "False", "the spec applied")
    assert "replicas" not in cluster.service(name)["spec"]  # nothing wrote it
    written = deployment_replicas_written(cluster, name)
    assert written == [low], written


async def test_a_gpu_service_with_integer_quantities_gets_its_deployment(cluster: Cluster) -> None:
    name, uid = fresh()
    gpus, cpus = random.randint(1, 8), random.randint(2, 64)
    async with running_operator():
        await cluster.create(name, {"model": "/models/qwen3-next", "engine": "sglang", "gpusPerReplica": gpus,
                                    "resources": {"limits": {"cpu": cpus, "memory": "64Gi"}}}, uid)
        await applied(cluster, name, 1)
        resources = cluster.object("apps/v1/deployments", name)["spec"]["template"]["spec"]["containers"][0][
            "resources"]
        assert resources == {"limits": {"cpu": str(cpus), "memory": "64Gi", "nvidia.com/gpu": str(gpus)},
                             "requests": {"nvidia.com/gpu": str(gpus)}}
        assert served_settings(cluster, name)["device"] == "cuda"


async def test_a_gpu_service_schedules_on_tainted_gpu_nodes_and_mounts_its_model(cluster: Cluster) -> None:
    """GPU nodes carry a taint and the weights of an 80B model live on a volume: the pods tolerate the taint and
    mount the volume where the spec's model path points; dropping the tolerations from the spec drops them."""
    name, uid = fresh()
    tp = random.choice([2, 4])
    claim, pool = f"weights-{uuid.uuid4().hex[:6]}", f"h200-{uuid.uuid4().hex[:6]}"
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                   {"key": "example.com/pool", "operator": "Equal", "value": pool, "effect": "NoSchedule"}]
    volumes = [{"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]
    mounts = [{"name": "models", "mountPath": "/models", "readOnly": True}]
    async with running_operator():
        await cluster.create(name, {
            "model": "/models/Qwen3-Next-80B-A3B-Instruct-FP8", "engine": "sglang", "gpusPerReplica": tp,
            "tensorParallelSize": tp, "nodeSelector": {"example.com/pool": pool}, "tolerations": tolerations,
            "volumes": volumes, "volumeMounts": mounts,
            "settings": {"buffer_size": 64, "chunk_size": 32, "sglang": {"quantization": "fp8"}}}, uid)
        await applied(cluster, name, 1)
        pod = cluster.object("apps/v1/deployments", name)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert pod["tolerations"] == tolerations
        assert volumes[0] in pod["volumes"] and mounts[0] in container["volumeMounts"]
        assert len({volume["name"] for volume in pod["volumes"]}) == len(pod["volumes"])  # no name twice
        assert served_settings(cluster, name)["sglang"] == {"quantization": "fp8", "tp_size": tp}

        await cluster.edit(name, {"tolerations": None})
        await applied(cluster, name, 2)
        assert "tolerations" not in cluster.object("apps/v1/deployments", name)["spec"]["template"]["spec"]


async def test_settings_edit_rolls_the_deployment_and_an_invalid_edit_never_reaches_a_pod(cluster: Cluster) -> None:
    name, uid = fresh()
    async with running_operator():
        await cluster.create(name, {"model": "m", "settings": {"buffer_size": 64, "chunk_size": 32}}, uid)
        await applied(cluster, name, 1)
        await cluster.roll_out(name)
        await wait_for(lambda: condition(cluster.service(name), "Progressing")["status"] == "False", "rolled out")
        first_hash = template_hash(cluster, name)

        chunk = 8 + uuid.uuid4().int % 24
        await cluster.edit(name, {"settings": {"buffer_size": 64, "chunk_size": chunk, "decode_mode": "recurrent"}})
        await applied(cluster, name, 2)
        assert served_settings(cluster, name)["chunk_size"] == chunk
        assert served_settings(cluster, name)["decode_mode"] == "recurrent"
        deployment = cluster.object("apps/v1/deployments", name)
        assert template_hash(cluster, name) != first_hash
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        await wait_for(lambda: condition(cluster.service(name), "Progressing")["status"] == "True", "rolling")
        await wait_for(lambda: "Updated" in reasons(cluster, name), "an Updated Event")

        # chunk_size + drafts > buffer_size passes the schema (a CEL rule's job) but not the operator's check.
        bad = {"settings": {"buffer_size": 64, "chunk_size": 62, "decode_mode": "kvbuffer",
                            "speculative_algorithm": "ngram", "speculative_num_draft_tokens": 4}}
        await cluster.edit(name, bad)
        await wait_for(lambda: condition(cluster.service(name), "Degraded")["status"] == "True", "Degraded=True")
        degraded = condition(cluster.service(name), "Degraded")
        assert degraded["reason"] == "InvalidSpec" and "chunk_size" in degraded["message"]
        await wait_for(lambda: "InvalidSpec" in reasons(cluster, name), "an InvalidSpec Event")
        assert served_settings(cluster, name)["chunk_size"] == chunk  # the old ConfigMap stays
        assert cluster.object("apps/v1/deployments", name) == deployment  # no pod sees the edit

        await cluster.edit(name, {"settings": {"chunk_size": 16, "speculative_algorithm": "none"}})
        await wait_for(lambda: condition(cluster.service(name), "Degraded")["status"] == "False", "recovered")
        assert served_settings(cluster, name)["chunk_size"] == 16


async def test_a_key_dropped_from_the_spec_leaves_the_objects_and_other_writers_keys_stay(cluster: Cluster) -> None:
    name, uid = fresh()
    selector = {f"example.com/pool-{index}": uuid.uuid4().hex[:8] for index in range(random.randint(2, 5))}
    async with running_operator():
        await cluster.create(name, {"model": "m", "nodeSelector": selector}, uid)
        await applied(cluster, name, 1)
        # Other writers: a label and a node selector entry (by hand, or a policy webhook), `kubectl rollout restart`
        # (a pod template annotation), a note in the ConfigMap.
        label, pool, restarted, note = ({key: uuid.uuid4().hex[:8]} for key in (
            "team", "example.com/zone", "kubectl.kubernetes.io/restartedAt", "notes"))
        await cluster.patch(f"/apis/apps/v1/namespaces/default/deployments/{name}", {
            "metadata": {"labels": label},
            "spec": {"template": {"metadata": {"annotations": restarted}, "spec": {"nodeSelector": pool}}}})
        await cluster.patch(f"/api/v1/namespaces/default/configmaps/{name}-config", {"data": note})

        dropped = random.choice(sorted(selector))
        chunk = random.randint(1, 32)  # and a settings edit, which rewrites the ConfigMap's own key
        await cluster.edit(name, {"nodeSelector": {dropped: None}, "settings": {"chunk_size": chunk}})
        await applied(cluster, name, 2)
        deployment = cluster.object("apps/v1/deployments", name)
        template = deployment["spec"]["template"]
        assert template["spec"]["nodeSelector"] == {**{k: v for k, v in selector.items() if k != dropped}, **pool}
        assert deployment["metadata"]["labels"] == {**r.selector_labels(name), **label}
        assert restarted.items() <= template["metadata"]["annotations"].items()
        assert cluster.object("v1/configmaps", f"{name}-config")["data"].keys() == {r.CONFIG_KEY, *note}
        assert served_settings(cluster, name)["chunk_size"] == chunk

        await cluster.edit(name, {"nodeSelector": None})  # the last entries: the operator's field goes whole
        await applied(cluster, name, 3)
        assert cluster.object("apps/v1/deployments", name)["spec"]["template"]["spec"]["nodeSelector"] == pool


async def test_schema_refuses_what_the_api_server_would(cluster: Cluster) -> None:
    name, uid = fresh()
    with pytest.raises(jsonschema.ValidationError):
        await cluster.create(name, {"model": "m", "settings": {"buffer_size": 0}}, uid)
    with pytest.raises(jsonschema.ValidationError):
        await cluster.create(name, {"model": "m", "settings": {"port": 1234}}, uid)  # set by the operator


async def test_restart_midway_converges_and_keeps_objects(cluster: Cluster) -> None:
    name, uid = fresh()
    async with running_operator():
        await cluster.create(name, {"model": "m", "replicas": 1}, uid)
        await applied(cluster, name, 1)
        await wait_for(lambda: reasons(cluster, name).count("Created") == 4, "the Created Events")

    replicas = 2 + uuid.uuid4().int % 3
    await cluster.edit(name, {"replicas": replicas, "settings": {"max_running_requests": 32}})  # while it is down
    async with running_operator():
        await applied(cluster, name, 2)
        assert cluster.object("apps/v1/deployments", name)["spec"]["replicas"] == replicas
        await wait_for(lambda: {"updated ConfigMap", "updated Deployment"} <= messages(cluster, name),
                       "Events for the updated ConfigMap and Deployment")
    # The same objects, patched, never created again; the Services had nothing to change.
    assert sorted(reasons(cluster, name)) == ["Created"] * 4 + ["Updated"] * 2


async def test_failing_api_calls_set_degraded_and_are_retried(cluster: Cluster) -> None:
    name, uid = fresh()
    cluster.emulator.fail("POST", "/deployments", times=2)
    async with running_operator(retry_seconds=0.5):
        await cluster.create(name, {"model": "m"}, uid)
        await wait_for(lambda: condition(cluster.service(name), "Degraded")["reason"] == "ApplyFailed",
                       "Degraded=True after the failed create")
        await applied(cluster, name, 1)
        await wait_for(lambda: condition(cluster.service(name), "Degraded")["status"] == "False", "recovered")
        assert cluster.object("apps/v1/deployments", name) is not None
        assert cluster.object("v1/configmaps", f"{name}-config") is not None


async def test_a_deployment_deleted_by_hand_is_made_again(cluster: Cluster) -> None:
    name, uid = fresh()
    async with running_operator():
        await cluster.create(name, {"model": "m", "replicas": 3}, uid)
        await applied(cluster, name, 1)
        response = await cluster.emulator.delete(f"/apis/apps/v1/namespaces/default/deployments/{name}")
        assert response.status < 300
        assert cluster.object("apps/v1/deployments", name) is None
        deployment = await wait_for(lambda: cluster.object("apps/v1/deployments", name), "the Deployment again")
        assert deployment["spec"]["replicas"] == 3
        assert deployment["metadata"]["ownerReferences"][0]["uid"] == uid


async def test_delete_leaves_cleanup_to_owner_references(cluster: Cluster) -> None:
    name, uid = fresh()
    async with running_operator():
        await cluster.create(name, {"model": "m"}, uid)
        await applied(cluster, name, 1)
        await cluster.delete(name)
        await wait_for(lambda: cluster.object(f"{r.API_VERSION}/{r.PLURAL}", name) is None, "the CR gone")
    # The garbage collector (not in the emulator) deletes these through their owner references.
    for resource, pattern in OWNED:
        assert cluster.object(resource, pattern.format(name))["metadata"]["ownerReferences"][0]["uid"] == uid




async def test_two_operators_elect_one(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """Leader election by kopf peering: both operators record themselves in the peering object, the one of higher
    priority handles the KVBufferService, the other stays paused (no handling logged from its thread)."""
    name, uid = fresh()
    low, high = sorted(random.sample(range(1, 10_000), 2))
    caplog.set_level(logging.INFO, logger="kopf")

    def records() -> dict[str, Any]:
        return cluster.object(f"{peering.GROUP}/{peering.VERSION}/kopfpeerings", peering.NAME)["status"]

    async with running_operator(standalone=False, priority=high, thread="leader"):
        await wait_for(lambda: len(records()) == 1, "the leader's peering record")
        async with running_operator(standalone=False, priority=low, thread="follower"):
            await wait_for(lambda: len(records()) == 2, "the follower's peering record")
            await cluster.create(name, {"model": "m"}, uid)
            await applied(cluster, name, 1)
            await cluster.edit(name, {"replicas": 3})
            await applied(cluster, name, 2)
            assert sorted(record["priority"] for record in records().values()) == [low, high]
    handled = {record.threadName for record in caplog.records if "is processed" in record.getMessage()}
    assert handled == {"leader"}
