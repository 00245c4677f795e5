"""A Kubernetes API for the operator's tests: kmock's KubernetesEmulator (a stand-in: no API server can run
here), served on loopback, with the real operator (kopf's event loop, the official kubernetes client) pointed at it
through a kubeconfig, as `kvbuffer operator` would be.

What the emulator does NOT do, and where it is covered instead:
- admission: no schema validation, no CEL, no defaulting, no immutability. `Cluster.create/edit` below validate
  each object against the CRD's schema with jsonschema before sending it (as the API server would), and
  test_operator_crd.py evaluates every CEL rule with cel-python.
- merge semantics: every PATCH is applied as a JSON merge patch (dicts merged, lists replaced, null deletes),
  never strategic merge nor server-side apply (no field managers, no managedFields); the operator sends merge
  patches only (with nulls for keys it applied before and applies no longer: its last-applied record), and
  test_operator_render.py checks `contains()` against objects as the server returns them (defaulted fields,
  quantities as strings) and those patches against a plain-dict oracle.
- resource versions and generations: Emulator below assigns them as the API server does and refuses a merge
  patch with a stale resourceVersion (409) or a JSON patch whose `test` of it fails (422), as the server does.
- controllers: no Deployment controller (tests write the Deployment status the controller would), no garbage
  collector (tests assert the owner references it would follow), no pods unless a test creates them.
- uids and timestamps: the test gives the KVBufferService its uid; no creationTimestamp is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import kmock
import yaml
from kvbuffer.operator import crd, main, peering, rbac
from kvbuffer.operator import resource as r
from kvbuffer.operator.cluster import contains
from kvbuffer.operator.settings import OperatorSettings

NAMESPACE = "default"
CR = f"{r.API_VERSION}/{r.PLURAL}"
WAIT_S = 30.0  # upper bound of any wait: a deadline for failure, not a timing assertion


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus what the API server does to metadata that the operator and kopf rely on:
    `generateName` (kopf's Events), `generation` (1 at creation, +1 on a patch that changes the spec) and
    `resourceVersion` (a new one on every write; a merge patch that names an older one fails with 409 Conflict)."""

    versions = itertools.count(1)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.failures: list[list[Any]] = []  # [method, path part, times left, status]

    def fail(self, method: str, path_part: str, times: int, status: int = 500) -> None:
        """Answer the next `times` requests of `method` whose path contains `path_part` with an error `status`."""
        self.failures.append([method.upper(), path_part, times, status])

    async def _handle(self, request: kmock.Request) -> Any:
        for failure in self.failures:
            method, part, left, status = failure
            if left > 0 and request.method.value == method and part in request.url.path:
                failure[2] -= 1
                raise kmock.KubernetesError(status, "InternalError", f"injected failure of {method} {part}")
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            self._stamp(request)
        return await super()._handle(request)

    async def _render_error(self, exc: Exception) -> Any:
        if isinstance(exc, jsonpatch.JsonPatchTestFailed):  # the API server answers a failed `test` with 422
            exc = kmock.KubernetesError(422, "Invalid", str(exc))
        return await super()._render_error(exc)

    def _stamp(self, request: kmock.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        current = self.objects[key].raw if key in self.objects and not self.objects[key].deleted else None
        if isinstance(request.data, list):  # a JSON patch (kopf's finalizers): its own ops test the version
            request.data.append({"op": "replace", "path": "/metadata/resourceVersion",
                                 "value": str(next(self.versions))})
            return
        metadata = request.data.setdefault("metadata", {})
        if request.action == kmock.action.CREATE:
            if not metadata.get("name") and metadata.get("generateName"):
                metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:8]
            metadata["generation"] = 1
        elif current is not None:
            expected = metadata.get("resourceVersion")
            if expected is not None and expected != current["metadata"].get("resourceVersion"):
                raise kmock.KubernetesError(409, "Conflict", f"the object has been modified (now "
                                            f"{current['metadata'].get('resourceVersion')}, not {expected})")
            if "spec" in request.data and not request.subresource and not contains(current.get("spec"),
                                                                                  request.data["spec"]):
                metadata["generation"] = current["metadata"].get("generation", 1) + 1
        metadata["resourceVersion"] = str(next(self.versions))


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
            kind=spec["names"]["kind"], singular=spec["names"].get("singular"),
            namespaced=spec["scope"] == "Namespaced",
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
            subresources=set(version.get("subresources", {})))


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": NAMESPACE}}]}))
    return path


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server (and kmock) apply a merge patch: dicts merge, None deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


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
                "metadata": {"name": name, "namespace": NAMESPACE, "uid": uid}}
        admit(body)
        response = await self.emulator.post(f"/apis/{r.API_VERSION}/namespaces/{NAMESPACE}/{r.PLURAL}", json=body)
        assert response.status < 300, await response.text()

    async def edit(self, name: str, spec: dict[str, Any]) -> None:
        """A spec edit (merged into the spec, as `kubectl patch --type merge`), validated as the API server would."""
        admit(merge_patch(self.service(name), {"spec": spec}))
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
async def emulated_api(directory: Path, environment: Any) -> AsyncIterator[Cluster]:
    """The emulator on a loopback port, KUBECONFIG (set through `environment`, pytest's monkeypatch) naming it."""
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        declare_resources(emulator)
        environment.setenv("KUBECONFIG", str(write_kubeconfig(directory / "kubeconfig", str(server.url))))
        yield Cluster(emulator)


@contextlib.asynccontextmanager
async def running_operator(standalone: bool = True, thread: str = "operator", **settings: Any) -> AsyncIterator[None]:
    """`kvbuffer operator` (kvbuffer.operator.main.run) in a thread of its own until the block ends: its own event
    loop, as in its own process, so that it sees the emulator only through HTTP."""
    options = OperatorSettings(namespace=[NAMESPACE], standalone=standalone, health_port=free_port(), **settings)
    stop, ready = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            asyncio.run(main.run(options, stop=stop, ready=ready))
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
            ready.set()

    runner = threading.Thread(target=serve, name=thread, daemon=True)
    runner.start()
    await asyncio.to_thread(ready.wait, WAIT_S)
    if failure:
        raise failure[0]
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(runner.join, WAIT_S)
        assert not runner.is_alive(), "the operator did not stop"
        if failure:
            raise failure[0]


def api_call(request: kmock.Request) -> tuple[str, str, str] | None:
    """(API group, resource[/subresource], RBAC verb) of one request the operator made; None for the test's own
    requests and for discovery."""
    if request.resource is None or not request.resource.plural or request.headers.get("User-Agent", "").startswith(
            "kmock/"):
        return None
    method = request.method.value
    if method == "GET":
        verb = "get" if request.name else "watch" if request.params.get("watch") == "true" else "list"
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]
    resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
    return request.resource.group, resource, verb


def operator_calls(emulator: kmock.KubernetesEmulator) -> set[tuple[str, str, str]]:
    return {call for request in emulator if (call := api_call(request)) is not None}


def rbac_allowed() -> set[tuple[str, str, str]]:
    """(API group, resource, verb) the operator's RBAC rules grant (cluster-wide rules included)."""
    return {(group, resource, verb) for rule in [*rbac.RULES, *rbac.CLUSTER_RULES] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}
