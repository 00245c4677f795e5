"""A Kubernetes API for the operator's tests: kmock's KubernetesEmulator (a stand-in: no API server can run
here), served on loopback, with the real operator (kopf's event loop, the official kubernetes client) pointed at it
through a kubeconfig, as `kvbuffer operator` would be.

What the emulator does NOT do, and where it is covered instead:
- admission: no schema validation, no CEL, no defaulting, no immutability. `Cluster.create/edit` below validate
  each object against the CRD's schema with jsonschema before sending it (as the API server would), and
  test_operator_crd.py evaluates every CEL rule with cel-python.
- merge semantics: every PATCH is applied as a JSON merge patch (dicts merged, lists replaced), never strategic
  merge; the operator sends merge patches only, and test_operator_render.py checks `contains()` against objects
  as the server returns them (defaulted fields, quantities as strings).
- resource versions: none are assigned and none conflict; test_operator_cluster.py injects a 409 to cover the
  retry. Generations: Emulator below assigns them as the API server does.
- controllers: no Deployment controller (tests write the Deployment status the controller would), no garbage
  collector (tests assert the owner references it would follow), no pods unless a test creates them.
- uids, resource versions and timestamps: the test gives the KVBufferService its uid and a resourceVersion that
  never changes (kopf tests it in its JSON patches).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jsonschema
import kmock
import yaml
from kvbuffer.operator import crd, main, peering
from kvbuffer.operator.cluster import contains
from kvbuffer.operator import resource as r
from kvbuffer.operator.settings import OperatorSettings

NAMESPACE = "default"
CR = f"{r.API_VERSION}/{r.PLURAL}"
WAIT_S = 30.0  # upper bound of any wait: a deadline for failure, not a timing assertion


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus what the API server does to metadata and the operator relies on: `generateName`
    (kopf names its Events that way) and `generation` (1 at creation, +1 on each patch that changes the spec)."""

    async def _handle(self, request: kmock.Request) -> Any:
        if isinstance(request.data, dict) and request.resource is not None:
            metadata = request.data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                if not metadata.get("name") and metadata.get("generateName"):
                    metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:8]
                metadata.setdefault("generation", 1)
            elif request.action == kmock.action.UPDATE and "spec" in request.data and not request.subresource:
                key = (request.resource, request.namespace, request.name)
                current = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else {}
                if current and not contains(current.get("spec"), request.data["spec"]):
                    metadata["generation"] = current["metadata"].get("generation", 1) + 1
        return await super()._handle(request)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def declare_resources(emulator: kmock.KubernetesEmulator) -> None:
    """The built-in resources (kmock's bundled discovery), the KVBufferService CRD and kopf's peering CRDs."""
    emulator.resources.load_bundled()
    for definition in (crd.crd(), *peering.CRDS):
        spec = definition["spec"]
        version = spec["versions"][0]
        emulator.resources[f"{spec['group']}/{version['name']}/{spec['names']['plural']}"] = kmock.ResourceInfo(
            kind=spec["names"]["kind"], singular=spec["names"].get("singular"), namespaced=spec["scope"] == "Namespaced",
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
            subresources=set(version.get("subresources", {})))


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": NAMESPACE}}]}))
    return path


def admit(obj: dict[str, Any]) -> None:
    """What the API server's schema check would refuse (CEL rules: test_operator_crd.py)."""
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.validate(obj, crd_to_jsonschema(schema))


def crd_to_jsonschema(node: Any) -> Any:
    """OpenAPI v3.0 (boolean exclusiveMinimum, nullable) -> the JSON Schema draft jsonschema checks."""
    if isinstance(node, list):
        return [crd_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: crd_to_jsonschema(value) for key, value in node.items() if not key.startswith("x-kubernetes")}
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(key) is True:
            out[key] = out.pop(bound)
        elif out.get(key) is False:
            del out[key]
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not node.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # the API server prunes (kubectl: refuses) unknown fields
    return out


class Cluster:
    """The test's side of the API: create, edit and delete KVBufferServices, look at what the operator made."""

    def __init__(self, emulator: kmock.KubernetesEmulator) -> None:
        self.emulator = emulator

    def object(self, resource: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self.emulator.objects or self.emulator.objects[key].deleted:
            return None
        return self.emulator.objects[key].raw

    def service(self, name: str) -> dict[str, Any]:
        obj = self.object(CR, name)
        assert obj is not None, f"KVBufferService {name} is gone"
        return obj

    def events(self, name: str) -> list[dict[str, Any]]:
        return [obj.raw for (res, _, _), obj in list(self.emulator.objects.items())
                if res == kmock.resource("v1/events") and not obj.deleted
                and obj.raw.get("involvedObject", {}).get("name") == name]

    async def create(self, name: str, spec: dict[str, Any], uid: str) -> None:
        body = {"apiVersion": r.API_VERSION, "kind": r.KIND, "spec": spec,
                "metadata": {"name": name, "namespace": NAMESPACE, "uid": uid, "resourceVersion": "1"}}
        admit(body)
        response = await self.emulator.post(f"/apis/{r.API_VERSION}/namespaces/{NAMESPACE}/{r.PLURAL}", json=body)
        assert response.status < 300, await response.text()

    async def edit(self, name: str, spec: dict[str, Any]) -> None:
        """A spec edit (merged into the spec, as `kubectl patch --type merge`), validated as the API server would."""
        current = self.service(name)
        admit({**current, "spec": {**current["spec"], **spec}})
        await self.patch(f"/apis/{r.API_VERSION}/namespaces/{NAMESPACE}/{r.PLURAL}/{name}", {"spec": spec})

    async def patch(self, path: str, body: dict[str, Any]) -> None:
        response = await self.emulator.patch(path, json=body,
                                             headers={"Content-Type": "application/merge-patch+json"})
        assert response.status < 300, await response.text()

    async def delete(self, name: str) -> None:
        response = await self.emulator.delete(f"/apis/{r.API_VERSION}/namespaces/{NAMESPACE}/{r.PLURAL}/{name}")
        assert response.status < 300, await response.text()

    async def roll_out(self, name: str, ready: int | None = None) -> None:
        """Play the Deployment controller: the Deployment's pods are all updated and `ready` of them ready."""
        deployment = self.object("apps/v1/deployments", name)
        assert deployment is not None
        wanted = deployment["spec"]["replicas"]
        ready = wanted if ready is None else ready
        await self.patch(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{name}/status", {"status": {
            "observedGeneration": deployment["metadata"].get("generation", 1), "replicas": wanted,
            "updatedReplicas": wanted, "readyReplicas": ready, "availableReplicas": ready}})


async def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Poll until condition() is truthy; fail naming `what` after timeout (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(AssertionError, KeyError, TypeError, IndexError):
            value = condition()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def condition(obj: dict[str, Any], type: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type), None)


@contextlib.asynccontextmanager
async def running_operator(standalone: bool = True, **settings: Any) -> AsyncIterator[None]:
    """`kvbuffer operator` (kvbuffer.operator.main.run) in this event loop until the block ends."""
    options = OperatorSettings(namespace=[NAMESPACE], standalone=standalone, health_port=free_port(), **settings)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(main.run(options, stop=stop, ready=ready))
    await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # start-up failed: raise its error here
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)
