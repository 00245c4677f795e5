"""The Helm chart with the real helm: lint and render over the defaults and the realistic values files of ci/, every
rendered object valid for Kubernetes 1.35 (kubernetes-validate, strict), custom resources valid for their CRD,
values that break values.schema.json refused at install, and the pods hardened and wired as the issue asks."""

from __future__ import annotations

import json
import random
import re
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_harness import (
    CHART,
    CI_VALUES,
    VALUES_CASES,
    VALUES_IDS,
    crd,
    helm,
    of_kind,
    render,
    values_args,
    values_schema_module,
)
from kvbuffer.operator.render import config_text
from kvbuffer.operator.render import deployment as render_deployment
from kvbuffer.operator.spec import parse_spec
from kvbuffer.service.server.settings import ServiceSettings, load_settings

KUBERNETES_VERSION = "1.35.0"
# Kinds of the Prometheus operator, whose schemas no registry package here ships: their content is checked by
# test_helm_monitoring.py (selectors against the rendered Services, rules by promtool).
PROMETHEUS_OPERATOR_KINDS = frozenset({"ServiceMonitor", "PrometheusRule"})
STARTUP_BUDGET_S = 1800  # a large model loads for minutes: the start-up probe must allow at least this long


@pytest.mark.parametrize("values", VALUES_CASES, ids=VALUES_IDS)
def test_lint_is_clean(values: Path | None) -> None:
    helm("lint", "--strict", str(CHART), *values_args(values))


@pytest.mark.parametrize("values", VALUES_CASES, ids=VALUES_IDS)
def test_every_rendered_object_is_valid_for_kubernetes(values: Path | None) -> None:
    objects = render(values)
    crd_schema = values_schema_module().json_schema(
        crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    for obj in objects:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] == "KVBufferService":
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in jsonschema.Draft7Validator(crd_schema).iter_errors(obj)]
            assert not errors, f"{where}: {errors}"
        elif obj["kind"] not in PROMETHEUS_OPERATOR_KINDS:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{where}: {'.'.join(map(str, exc.absolute_path))}: {exc.message}") from None


def test_values_schema_is_generated_from_values_yaml() -> None:
    schema = values_schema_module()
    assert (CHART / "values.schema.json").read_text() == schema.render(), \
        "values.schema.json is stale: run python deploy/helm/kvbuffer/values_schema.py"


def test_service_settings_schema_is_the_crds() -> None:
    """The settings a values file may give are exactly those a KVBufferService may carry, with the same bounds."""
    values_schema = json.loads((CHART / "values.schema.json").read_text())
    expected = values_schema_module().crd_schema(crd(), "spec.settings")
    assert values_schema["properties"]["server"]["properties"]["settings"]["properties"] == expected["properties"]
    assert values_schema["properties"]["services"]["items"]["properties"]["settings"]["properties"] == \
        expected["properties"]


BAD_VALUES = [
    (["services[0].settings.buffer_size=0"], "buffer_size"),
    (["services[0].settings.decode_mode=fast"], "decode_mode"),
    (["services[0].settings.bufer_size=64"], "bufer_size"),
    (["services[0].engine=vllm"], "engine"),
    (["services[0].gpusPerReplica=-1"], "gpusPerReplica"),
    (["services[0].name=Not_A_Name"], "name"),
    (["server.settings.chunk_size=many"], "chunk_size"),
    (["server.replicaz=2"], "replicaz"),
    (["image.pullPolicy=Sometimes"], "pullPolicy"),
    (["monitoring.prometheusRule.refusedRatio=2"], "refusedRatio"),
    (["otel.JAEGER_ENDPOINT=http://x"], "JAEGER_ENDPOINT"),
    (["otel.OTEL_SERVICE_NAME=traces"], "OTEL_SERVICE_NAME"),  # each service's own name, set by chart and operator
    (["operator.watchNamespaces[0]=Bad_Namespace"], "watchNamespaces"),
]


@pytest.mark.parametrize(("sets", "field"), BAD_VALUES, ids=[field for _sets, field in BAD_VALUES])
def test_values_breaking_the_schema_are_refused(sets: list[str], field: str) -> None:
    result = helm("template", "kvbuffer", str(CHART), *values_args(None, *sets), check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr and field in result.stderr, \
        result.stderr


def test_a_service_without_a_model_is_refused() -> None:
    result = helm("template", "kvbuffer", str(CHART), "--set-json", 'services=[{"name": "nameless"}]', check=False)
    assert result.returncode != 0 and "model" in result.stderr, result.stderr


@pytest.mark.parametrize(("sets", "message"), [
    (["server.enabled=true", "server.tensorParallelSize=2", "server.gpusPerReplica=2"], "needs server.engine sglang"),
    (["server.enabled=true", "server.engine=sglang", "server.tensorParallelSize=2", "server.gpusPerReplica=3"],
     "must be a multiple of server.tensorParallelSize"),
])
def test_inconsistent_server_values_fail_with_a_message(sets: list[str], message: str) -> None:
    result = helm("template", "kvbuffer", str(CHART), *values_args(None, *sets), check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def _pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    specs = {f"Deployment {d['metadata']['name']}": d["spec"]["template"]["spec"]
             for d in of_kind(objects, "Deployment")}
    specs.update({f"Pod {p['metadata']['name']}": p["spec"] for p in of_kind(objects, "Pod")})
    return specs


@pytest.mark.parametrize("values", VALUES_CASES, ids=VALUES_IDS)
def test_every_pod_runs_restricted(values: Path | None) -> None:
    for where, spec in _pod_specs(render(values)).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (where, container["name"])
            assert context["allowPrivilegeEscalation"] is False, (where, container["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (where, container["name"])


def _server(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (server,) = [d for d in of_kind(objects, "Deployment")
                 if d["metadata"]["labels"]["app.kubernetes.io/component"] == "server"]
    return server


def _settings_file(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (config,) = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-config")]
    return yaml.safe_load(config["data"]["settings.yaml"])


def _gpu_service(rng: random.Random) -> dict[str, Any]:
    """A KVBufferService spec as a platform team writes one for a GPU pool (80B model, tensor parallel, FP8)."""
    tp = rng.choice([1, 2, 4])
    buffer_size = rng.choice([64, 128])
    grace = rng.choice([{}, {"shutdown_grace_period_s": rng.randint(10, 120)},
                        {"shutdown_grace_period_s": round(rng.uniform(1, 120), 1)}])
    return {"model": "/models/Qwen3-Next-80B-A3B-Instruct-FP8", "engine": "sglang", "replicas": rng.randint(1, 4),
            "gpusPerReplica": tp * rng.randint(1, 2), "tensorParallelSize": tp,
            "resources": {"requests": {"cpu": str(8 * tp), "memory": f"{64 * tp}Gi"}},
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
            "settings": {"buffer_size": buffer_size, "chunk_size": rng.randint(1, buffer_size // 2),
                         "decode_mode": "kvbuffer", **grace, "sglang": {"quantization": "fp8"}}}


def _otel(rng: random.Random) -> dict[str, str]:
    """`otel` values as a platform team sets them: where traces go, how, and attributes of every span."""
    optional = {"OTEL_EXPORTER_OTLP_PROTOCOL": rng.choice(["grpc", "http/protobuf"]),
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(rng.random())}
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://otel-{uuid.uuid4().hex[:6]}.observability:4317",
            "OTEL_RESOURCE_ATTRIBUTES": f"deployment.environment={uuid.uuid4().hex[:6]},service.namespace=inference",
            **dict(rng.sample(sorted(optional.items()), rng.randint(0, len(optional))))}


def test_operator_pods_run_as_the_charts_server_pods(tmp_path: Path) -> None:
    """The same service, made by the operator (a KVBufferService of this chart) or by the chart (`server`), runs
    alike: the same settings, the same environment (the `otel` variables, each service named after itself), /dev/shm
    and time to drain on SIGTERM, and the chart's hardening (restricted pod security, read-only root with writable
    scratch), so a namespace that enforces the restricted Pod Security Standard admits the operator's pods too."""
    rng = random.Random()
    spec = _gpu_service(rng)
    objects = render(None, "server.enabled=true", set_json={
        "services": [{"name": "kvbuffer", **spec}], "otel": _otel(rng),
        **{f"server.{key}": value for key, value in spec.items()}})
    chart_pod = _server(objects)["spec"]["template"]["spec"]
    (service,) = of_kind(objects, "KVBufferService")
    operator_pod = render_deployment(service["metadata"]["name"], "inference", "uid", parse_spec(service["spec"]))[
        "spec"]["template"]["spec"]
    files = {}
    for source, text in (("chart", yaml.safe_dump(_settings_file(objects))),
                         ("operator", config_text(parse_spec(spec)))):
        (tmp_path / f"{source}.yaml").write_text(text)
        files[source] = load_settings(config_file=tmp_path / f"{source}.yaml")
    assert files["operator"] == files["chart"]
    assert operator_pod["securityContext"] == chart_pod["securityContext"]
    assert operator_pod.get("enableServiceLinks") == chart_pod["enableServiceLinks"]
    (chart_container,), (operator_container,) = chart_pod["containers"], operator_pod["containers"]
    assert operator_container["securityContext"] == chart_container["securityContext"]
    assert {e["name"]: e for e in operator_container["env"]} == {e["name"]: e for e in chart_container["env"]}
    assert operator_container["image"] == chart_container["image"]
    assert operator_pod["terminationGracePeriodSeconds"] == chart_pod["terminationGracePeriodSeconds"]
    (operator_shm,), (chart_shm,) = ([v for v in pod["volumes"] if v["name"] == "shm"]
                                     for pod in (operator_pod, chart_pod))
    assert operator_shm == chart_shm

    def scratch(pod: dict[str, Any], container: dict[str, Any]) -> set[str]:
        """Where the container may write: the mount paths of its emptyDir volumes."""
        empty = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
        return {mount["mountPath"] for mount in container["volumeMounts"] if mount["name"] in empty}

    assert scratch(chart_pod, chart_container) <= scratch(operator_pod, operator_container)


def test_server_deployment_serves_the_values_settings_on_gpus(tmp_path: Path) -> None:
    gpus = random.choice([1, 2, 4])
    settings = {"buffer_size": random.choice([32, 64, 128]), "chunk_size": 16, "max_running_requests": 48,
                "decode_mode": random.choice(["kvbuffer", "recurrent"])}
    objects = render(None, "server.enabled=true", f"server.gpusPerReplica={gpus}", "server.engine=sglang",
                     f"server.tensorParallelSize={gpus}", "server.model=/models/q",
                     *(f"server.settings.{k}={v}" for k, v in settings.items()),
                     "server.settings.sglang.quantization=fp8")
    rendered = _settings_file(objects)
    assert rendered == {**settings, "model": "/models/q", "engine": "sglang", "device": "cuda",
                        "sglang": {"tp_size": gpus, "quantization": "fp8"},
                        "host": "0.0.0.0", "port": 50051, "metrics_port": 9464}
    assert ServiceSettings(**rendered).sglang.tp_size == gpus  # the service reads the file the chart writes
    (container,) = _server(objects)["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["image"] == "kvbuffer:0.1.0"  # the GPU image (SGLang's CUDA libraries)
    assert container["args"] == ["serve", "--config", "/etc/kvbuffer/settings.yaml"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": 50051, "metrics": 9464}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/tmp", "/home/kvbuffer"} <= mounts


def test_rendered_settings_file_is_accepted_by_the_service(tmp_path: Path) -> None:
    """The oracle is the service itself: `kvbuffer serve --config` loads the file the chart writes."""
    for values in CI_VALUES:
        objects = render(values)
        if not any(c["metadata"]["name"].endswith("-config") for c in of_kind(objects, "ConfigMap")):
            continue
        settings = _settings_file(objects)
        settings.pop("tls", None)  # names files of a Secret mounted in the pod
        config = tmp_path / f"{values.stem}.yaml"
        config.write_text(yaml.safe_dump(settings))
        loaded = load_settings(config_file=config)
        assert loaded.buffer_size == settings.get("buffer_size", loaded.buffer_size)
        assert loaded.model == settings["model"]


def test_probes_speak_grpc_health_and_allow_a_model_load() -> None:
    (container,) = _server(render(None, "server.enabled=true"))["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051, "service": "kvbuffer.v1.KVBufferService"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_BUDGET_S


def test_tls_and_token_come_from_secrets() -> None:
    objects = render(CHART / "ci" / "tls-values.yaml")
    spec = _server(objects)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["KVBUFFER_AUTH__TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "kvbuffer-token", "key": "token"}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability:4317"
    assert {v["name"]: v.get("secret", {}).get("secretName") for v in spec["volumes"]}["tls"] == "kvbuffer-tls"
    assert _settings_file(objects)["tls"] == {"cert_file": "/etc/kvbuffer/tls/tls.crt",
                                              "key_file": "/etc/kvbuffer/tls/tls.key"}
    assert "token" not in json.dumps(_settings_file(objects)).lower()
    # Kubernetes' gRPC probe speaks no TLS: the pod checks its own health over TLS.
    command = container["readinessProbe"]["exec"]["command"]
    assert command[:3] == ["python3", "-m", "kvbuffer.service.server.health_check"]
    assert command[command.index("--server-name") + 1] == "kvbuffer.inference.svc"
    (test_pod,) = of_kind(objects, "Pod")
    generate = test_pod["spec"]["containers"][0]
    assert generate["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "kvbuffer-token"
    assert "--ca-file" in generate["args"] and "--ca-file" in test_pod["spec"]["initContainers"][0]["command"]


def test_server_has_a_headless_service_and_every_service_a_disruption_budget() -> None:
    replicas = random.randint(2, 6)
    objects = render(None, "server.enabled=true", f"server.replicas={replicas}")
    services = {s["metadata"]["name"]: s["spec"] for s in of_kind(objects, "Service")}
    assert services["kvbuffer-headless"]["clusterIP"] == "None"
    assert services["kvbuffer"]["selector"] == services["kvbuffer-headless"]["selector"]
    pod_labels = _server(objects)["spec"]["template"]["metadata"]["labels"]
    assert services["kvbuffer"]["selector"].items() <= pod_labels.items()
    budgets = {b["metadata"]["name"]: b["spec"] for b in of_kind(objects, "PodDisruptionBudget")}
    assert budgets["kvbuffer"]["maxUnavailable"] == 1
    assert budgets["kvbuffer"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # The default KVBufferService's pods, labelled by the operator as CONTRACTS.md says, have theirs.
    assert budgets["tiny-qwen3-next"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kvbuffer", "app.kubernetes.io/instance": "tiny-qwen3-next",
        "app.kubernetes.io/component": "server"}
    assert not of_kind(render(None, "podDisruptionBudget.enabled=false"), "PodDisruptionBudget")


def test_pods_of_the_direct_server_carry_the_operators_pod_labels() -> None:
    """The ServiceMonitor, dashboard and alerts treat both kinds of servers alike (CONTRACTS.md's pod labels)."""
    labels = _server(render(None, "server.enabled=true"))["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "kvbuffer" and labels["app.kubernetes.io/component"] == "server"


def test_kvbufferservices_are_the_values_entries() -> None:
    entries = [{"name": f"svc-{i}", "model": f"/models/m{i}", "replicas": random.randint(0, 4),
                "gpusPerReplica": gpus, "settings": {"buffer_size": 64, "chunk_size": random.choice([8, 16, 32])}}
               for i, gpus in enumerate(random.sample([0, 1, 2], 2))]
    objects = render(None, set_json={"services": entries})
    resources = {o["metadata"]["name"]: o for o in of_kind(objects, "KVBufferService")}
    assert sorted(resources) == [e["name"] for e in entries]
    for entry in entries:
        resource = resources[entry["name"]]
        assert resource["apiVersion"] == "serving.kvbuffer.io/v1alpha1"
        image = "kvbuffer:0.1.0" if entry["gpusPerReplica"] else "kvbuffer:0.1.0-cpu"
        assert resource["spec"] == {**{k: v for k, v in entry.items() if k != "name"}, "image": image}


def test_autoscaled_services_leave_replicas_to_the_operator() -> None:
    """Helm applies what it renders: a spec.replicas in an autoscaled KVBufferService would fight the count the
    operator's autoscaler chose at a `helm upgrade` (reset it, or conflict with it under server-side apply). Without
    autoscaling, the entry's replicas are the spec's."""
    entries = [{"name": f"svc-{i}", "model": f"/models/m{i}", "replicas": random.randint(0, 8),
                **({"autoscaling": {"enabled": enabled, "minReplicas": 1, "maxReplicas": random.randint(1, 8)}}
                   if enabled is not None else {})}
               for i, enabled in enumerate([True, False, None, True])]
    resources = {o["metadata"]["name"]: o["spec"] for o in of_kind(render(None, set_json={"services": entries}),
                                                                    "KVBufferService")}
    for entry in entries:
        autoscaled = entry.get("autoscaling", {}).get("enabled", False)
        assert resources[entry["name"]].get("replicas") == (None if autoscaled else entry["replicas"]), entry


def test_kvbufferservices_get_the_otel_variables_and_keep_their_own_env() -> None:
    """The chart's `otel` variables reach the KVBufferServices, as its server's pods get them; an entry's own
    variable of the same name wins, and its other variables stay after them."""
    rng = random.Random()
    otel = _otel(rng)
    overridden = rng.choice(sorted(otel))
    own = [{"name": overridden, "value": uuid.uuid4().hex},
           {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]
    entries = [{"name": "plain", "model": "/models/m"}, {"name": "own", "model": "/models/m", "env": own}]
    resources = {o["metadata"]["name"]: o["spec"] for o in of_kind(
        render(None, set_json={"services": entries, "otel": otel}), "KVBufferService")}
    assert {e["name"]: e["value"] for e in resources["plain"]["env"]} == otel
    inherited = [{"name": key, "value": value} for key, value in sorted(otel.items()) if key != overridden]
    assert resources["own"]["env"] == inherited + own
    assert "env" not in of_kind(render(None), "KVBufferService")[0]["spec"]  # no otel, no env: none rendered


def _rbac_file() -> dict[str, Any]:
    return yaml.safe_load((CHART / "files" / "operator-rbac-rules.yaml").read_text())


def test_operator_rbac_is_the_operators_rules_cluster_wide() -> None:
    objects = render(None)
    (role,) = of_kind(objects, "ClusterRole")
    assert role["rules"] == _rbac_file()["rules"] + _rbac_file()["clusterRules"]
    (binding,) = of_kind(objects, "ClusterRoleBinding")
    (account,) = of_kind(objects, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "inference"}]
    (operator,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-operator")]
    pod = operator["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert "--all-namespaces" in pod["containers"][0]["args"]


def test_operator_rbac_is_namespaced_when_it_watches_namespaces() -> None:
    namespaces = random.sample(["team-a", "team-b", "team-c", "ml"], 2)
    objects = render(None, set_json={"operator.watchNamespaces": namespaces})
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
    roles = of_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(namespaces)
    assert all(r["rules"] == _rbac_file()["rules"] for r in roles)
    assert sorted(b["metadata"]["namespace"] for b in of_kind(objects, "RoleBinding")) == sorted(namespaces)
    (operator,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-operator")]
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == namespaces


def test_operator_off_renders_no_operator() -> None:
    objects = render(CHART / "ci" / "operator-off-values.yaml")
    assert not [o for o in objects if re.search(r"-operator$", o["metadata"]["name"])]
    assert not of_kind(objects, "KVBufferService")


def test_crds_ship_unchanged() -> None:
    """The chart installs the CRD files of crds/ byte for byte (helm never templates that folder)."""
    rendered = {o["metadata"]["name"] for o in render(None) if o["kind"] == "CustomResourceDefinition"}
    shipped = {doc["metadata"]["name"] for path in (CHART / "crds").glob("*.yaml")
               for doc in yaml.safe_load_all(path.read_text()) if doc}
    assert rendered == shipped and "kvbufferservices.serving.kvbuffer.io" in rendered
