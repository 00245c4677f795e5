"""The desired objects as a pure function of the spec, without a cluster: valid against the Kubernetes schemas
(kubernetes-validate, strict, pinned version), read back by the service's own settings loader, rolled by a
settings change and only by one, compared with objects as the API server returns them (`contains`), and the
patch from what was applied last to what is applied now (`patch_from`) checked against a plain-dict oracle."""

from __future__ import annotations

import copy
import random
import uuid
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kvbuffer.operator import resource as r
from kvbuffer.operator.cluster import contains, patch_from
from kvbuffer.operator.render import config_hash, deployment, desired_objects
from kvbuffer.operator.spec import RESERVED_VOLUMES, KVBufferServiceSpec, SpecError, parse_spec
from kvbuffer.service.server.settings import ENV_PREFIX, ServiceSettings, load_settings
from operator_emulator import merge_patch

KUBERNETES_VERSION = "1.32.0"  # the schemas the objects must fit (kubectl and the API server of that release)


def random_spec(rng: random.Random) -> KVBufferServiceSpec:
    tp = rng.choice([1, 2, 4])
    buffer_size = rng.randint(16, 128)
    sglang = tp > 1 or rng.random() < 0.5  # the native engine runs one GPU
    return parse_spec({
        "model": "/models/qwen3-next" if sglang else rng.choice(["embedded:tiny-qwen3-next", "/models/qwen3-next"]),
        "engine": "sglang" if sglang else "native",
        "replicas": rng.randint(0, 8),
        "gpusPerReplica": tp * rng.randint(1 if sglang else 0, 2),
        "tensorParallelSize": tp,
        "resources": {"requests": {"cpu": rng.randint(1, 8), "memory": f"{rng.randint(1, 64)}Gi"}},
        "nodeSelector": {f"example.com/pool-{index}": uuid.uuid4().hex[:8] for index in range(rng.randint(0, 3))},
        "settings": {"buffer_size": buffer_size, "chunk_size": rng.randint(1, buffer_size),
                     "decode_mode": rng.choice(["kvbuffer", "recurrent"]),
                     "max_running_requests": rng.randint(1, 512), "shutdown_grace_period_s": rng.uniform(1, 120)},
    })


@pytest.mark.parametrize("seed", range(6))
def test_objects_are_valid_kubernetes_objects(seed: int) -> None:
    rng = random.Random()
    spec = random_spec(rng)
    for obj in desired_objects(f"svc-{seed}", "serving", "0c9a3f4e-uid", spec):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_config_map_is_what_the_server_reads(tmp_path: Path) -> None:
    spec = random_spec(random.Random())
    config = desired_objects("svc", "ns", "uid", spec)[0]
    path = tmp_path / r.CONFIG_KEY
    path.write_text(config["data"][r.CONFIG_KEY])
    served = load_settings(config_file=path)
    for name, value in spec.settings.items():
        assert getattr(served, name) == pytest.approx(value)
    assert (served.model, served.port, served.metrics_port) == (spec.model, r.GRPC_PORT, r.METRICS_PORT)
    assert served.device == ("cuda" if spec.gpus_per_replica else "cpu")


def test_settings_change_rolls_and_replicas_change_does_not() -> None:
    rng = random.Random()
    spec = random_spec(rng)
    more = spec.model_copy(update={"replicas": spec.replicas + 1})
    chunk = spec.settings["chunk_size"] % 16 + 1  # another chunk size, still within the buffer
    retuned = spec.model_copy(update={"settings": {**spec.settings, "chunk_size": chunk}})
    assert config_hash(more) == config_hash(spec)
    assert config_hash(retuned) != config_hash(spec)
    template = deployment("a", "ns", "uid", spec)["spec"]["template"]
    assert template["metadata"]["annotations"][r.CONFIG_HASH_ANNOTATION] == config_hash(spec)
    assert deployment("a", "ns", "uid", more)["spec"]["template"] == template


def test_deployment_keeps_capacity_and_probes_grpc() -> None:
    spec = parse_spec({"model": "m", "engine": "sglang", "gpusPerReplica": 4, "tensorParallelSize": 2,
                       "settings": {"shutdown_grace_period_s": 45}})
    obj = deployment("a", "ns", "uid-1", spec)
    assert obj["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pod = obj["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": r.GRPC_PORT}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": 50051, "metrics": 9464}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["terminationGracePeriodSeconds"] > 45
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert obj["spec"]["selector"]["matchLabels"] == r.selector_labels("a")
    assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_spec_volumes_may_not_take_the_operators_volume_names() -> None:
    """The operator's own volumes are RESERVED_VOLUMES; a spec volume of one of those names, or a mount of no spec
    volume, would make a pod the API server refuses: the operator refuses the spec first, naming the field."""
    spec = parse_spec({"model": "/models/q", "engine": "sglang", "gpusPerReplica": 2, "tensorParallelSize": 2})
    pod = deployment("a", "ns", "uid", spec)["spec"]["template"]["spec"]
    assert {volume["name"] for volume in pod["volumes"]} == RESERVED_VOLUMES
    taken = random.choice(sorted(RESERVED_VOLUMES))
    with pytest.raises(SpecError, match=f"volumes: {taken} is the operator's volume"):
        parse_spec({"model": "m", "volumes": [{"name": taken, "emptyDir": {}}]})
    with pytest.raises(SpecError, match="volumeMounts: weights names no volume"):
        parse_spec({"model": "m", "volumes": [{"name": "models", "emptyDir": {}}],
                    "volumeMounts": [{"name": "weights", "mountPath": "/models"}]})


def random_env(rng: random.Random) -> list[dict[str, Any]]:
    """EnvVars as users write them: OTLP export settings by value, a header from a Secret, a pod field."""
    sources = [{"secretKeyRef": {"name": f"otel-{uuid.uuid4().hex[:6]}", "key": "headers"}},
               {"fieldRef": {"fieldPath": "spec.nodeName"}}]
    env = [{"name": f"OTEL_{uuid.uuid4().hex[:6].upper()}", "value": uuid.uuid4().hex}
           for _ in range(rng.randint(0, 3))]
    env += [{"name": f"EXTRA_{index}", "valueFrom": source} for index, source in enumerate(rng.sample(sources, 2))]
    rng.shuffle(env)
    return env


def test_spec_env_reaches_the_server_container_after_the_operators() -> None:
    env = random_env(random.Random())
    obj = deployment("svc", "ns", "uid", parse_spec({"model": "m", "env": env}))
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [{"name": "OTEL_SERVICE_NAME", "value": "svc"}, *env]


def test_spec_env_may_not_take_the_operators_names() -> None:
    """OTEL_SERVICE_NAME is the operator's (each service's name in traces), and a KVBUFFER_* variable would set a
    service setting past the check of spec.settings: the operator refuses either, naming the field."""
    setting = random.choice([name for name in ServiceSettings.model_fields if name != "model"])
    taken = random.choice(["OTEL_SERVICE_NAME", f"{ENV_PREFIX}{setting.upper()}"])
    env = [*random_env(random.Random()), {"name": taken, "value": "1"}]
    with pytest.raises(SpecError, match=f"env: {taken} is set by the operator"):
        parse_spec({"model": "m", "env": env})
    with pytest.raises(SpecError, match="value and valueFrom exclude each other"):
        parse_spec({"model": "m", "env": [{"name": "X", "value": "1", "valueFrom": {"fieldRef": {}}}]})


@pytest.mark.parametrize("seed", range(3))
def test_autoscaled_pods_stay_within_the_bounds_from_the_first_deployment(seed: int) -> None:
    """Without spec.replicas (the chart leaves it to the autoscaler: the CRD's default 1), or with one out of bounds
    (a `kubectl scale`), an autoscaled service's Deployment runs within [minReplicas, maxReplicas] at once; without
    autoscaling, spec.replicas holds."""
    rng = random.Random()
    low = rng.randint(2, 6)
    high = low + rng.randint(0, 6)
    default = KVBufferServiceSpec.model_fields["replicas"].default
    cases = [({}, low), ({"replicas": rng.randint(0, low - 1)}, low), ({"replicas": rng.randint(low, high)}, None),
             ({"replicas": rng.randint(high + 1, 1000)}, high)]
    for replicas, bounded in cases:
        given = replicas.get("replicas", default)
        for enabled in (True, False):
            spec = parse_spec({"model": "m", **replicas,
                               "autoscaling": {"enabled": enabled, "minReplicas": low, "maxReplicas": high}})
            expected = (bounded or given) if enabled else given
            assert deployment("svc", "ns", "uid", spec)["spec"]["replicas"] == expected, (replicas, enabled)


def as_served(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as the API server returns it: metadata and defaults added, quantities as strings."""
    served = copy.deepcopy(obj)
    served["metadata"].update(uid="server-uid", resourceVersion="812", generation=3,
                              creationTimestamp="2026-01-01T00:00:00Z")
    if obj["kind"] == "Deployment":
        pod = served["spec"]["template"]["spec"]
        pod.update(dnsPolicy="ClusterFirst", restartPolicy="Always", schedulerName="default-scheduler")
        container = pod["containers"][0]
        container.update(imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log")
        for kind in container["resources"].values():
            kind.update({key: str(value) for key, value in kind.items()})
        served["status"] = {"replicas": 1}
    if obj["kind"] == "Service":
        served["spec"].update(clusterIP=served["spec"].get("clusterIP", "10.0.0.7"), sessionAffinity="None")
    return served


def test_contains_ignores_what_the_server_adds_and_sees_real_changes() -> None:
    spec = random_spec(random.Random())
    for obj in desired_objects("svc", "ns", "uid", spec):
        assert contains(as_served(obj), obj)
    obj = deployment("svc", "ns", "uid", spec)
    changed = deployment("svc", "ns", "uid", spec.model_copy(update={"image": "kvbuffer:next"}))
    assert not contains(as_served(obj), changed)
    fewer_ports = as_served(obj)
    fewer_ports["spec"]["template"]["spec"]["containers"][0]["ports"].pop()
    assert not contains(fewer_ports, obj)


def random_tree(rng: random.Random, prefix: str, depth: int = 3) -> dict[str, Any]:
    """Nested maps with string and list leaves, keys from a small set so that edits overlap."""
    return {f"{prefix}{rng.randint(0, 5)}": random_tree(rng, prefix, depth - 1) if depth and rng.random() < 0.4
            else rng.choice([uuid.uuid4().hex[:6], [rng.randint(0, 9)]]) for _ in range(rng.randint(0, 4))}


def edited(rng: random.Random, tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` with some keys dropped, some values replaced (a map by a leaf, a leaf by a map) and keys added."""
    out = {}
    for key, value in tree.items():
        roll = rng.random()
        if roll < 0.6:
            out[key] = edited(rng, value) if isinstance(value, dict) else value
        elif roll < 0.8:
            out[key] = rng.choice([uuid.uuid4().hex[:6], random_tree(rng, "new-", 1)])
    return {**out, **random_tree(rng, "new-", 1)}


def added_by_others(rng: random.Random, tree: dict[str, Any]) -> dict[str, Any]:
    """Keys another writer puts next to ours, in our maps and at the top."""
    nested = {key: added_by_others(rng, value) for key, value in tree.items()
              if isinstance(value, dict) and rng.random() < 0.7}
    return {**random_tree(rng, "other-", 1), **nested}


def without(current: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """`current` less every leaf that `last` set (its maps stay, with the keys others added)."""
    return {key: without(value, last[key]) if isinstance(last.get(key), dict) else value
            for key, value in current.items() if key not in last or isinstance(last[key], dict)}


@pytest.mark.parametrize("seed", range(20))
def test_patch_from_last_applied_drops_only_our_old_keys(seed: int) -> None:
    rng = random.Random()
    last = random_tree(rng, "k")
    desired = edited(rng, last)
    current = merge_patch(last, added_by_others(rng, last))
    expected = merge_patch(without(current, last), desired)  # ours replaced by desired, others' kept
    assert merge_patch(current, patch_from(last, desired)) == expected
    assert contains(expected, desired)
