"""The chart's monitoring objects: ServiceMonitors that select the Services the chart and the operator make, the
PrometheusRule's groups checked and unit-tested by promtool (the alerts fire on the series that should fire them
and stay quiet otherwise), and the Grafana dashboard shipped unchanged in a ConfigMap for the sidecar."""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_harness import CHART, CI_VALUES, VALUES_CASES, VALUES_IDS, of_kind, render, tool

ALL_ON = ("monitoring.serviceMonitor.enabled=true", "monitoring.prometheusRule.enabled=true",
          "monitoring.dashboards.enabled=true")


def _rule_groups(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (rule,) = of_kind(objects, "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("values", VALUES_CASES, ids=VALUES_IDS)
def test_rules_pass_promtool_check(values: Path | None, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(_rule_groups(render(values, *ALL_ON))))
    result = _promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    rendered = ", ".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{rendered}}}", "values": values}


def _alert(name: str, at: str, *fired: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels} for labels in fired]}


def test_alerts_fire_on_the_series_that_should_fire_them(tmp_path: Path) -> None:
    """promtool's rule unit tests over the tensor-parallel values: a kvbuffer service and a recurrent baseline."""
    groups = _rule_groups(render(CHART / "ci" / "tensor-parallel-values.yaml", *ALL_ON))
    for rule in (rule for group in groups["groups"] for rule in group["rules"]):
        rule.pop("annotations", None)  # promtool compares them verbatim; their templates are checked above
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(groups))
    ns, kv, base = "inference", "qwen3-next-80b", "qwen3-next-80b-baseline"
    at = {"namespace": ns, "service": kv}
    full, spare = random.randint(91, 99), random.randint(10, 80)  # state slots in use of 100
    requests = [_series("kvbuffer_request_duration_seconds_count", {**at, "pod": "a", "status": "OK"}, "0+100x40"),
                _series("kvbuffer_request_duration_seconds_count",
                        {**at, "pod": "a", "status": "RESOURCE_EXHAUSTED"}, "0+5x40"),
                _series("kvbuffer_request_duration_seconds_count",
                        {"namespace": ns, "service": base, "pod": "b", "status": "OK"}, "0+100x40"),
                _series("kvbuffer_request_duration_seconds_count",
                        {"namespace": ns, "service": base, "pod": "c", "status": "UNAVAILABLE"}, "0+3x40")]
    slots = [_series("kvbuffer_state_slots_used", {**at, "pod": "a"}, f"{full}x40"),
             _series("kvbuffer_state_slots_total", {**at, "pod": "a"}, "100x40"),
             _series("kvbuffer_state_slots_used", {"namespace": ns, "service": base, "pod": "b"}, f"{spare}x40"),
             _series("kvbuffer_state_slots_total", {"namespace": ns, "service": base, "pod": "b"}, "100x40")]
    # Both services decode mostly recurrent; only the one running decode_mode kvbuffer is wrong to.
    decoded = [_series("kvbuffer_decoded_tokens_total", {"namespace": ns, "service": service, "pod": "a", "path": path},
                       f"0+{rate}x60")
               for service in (kv, base) for path, rate in (("recurrent", 600), ("buffered", 60), ("stateless", 6))]
    # Time to first token: all requests between 5 and 10 s (threshold 5 s in these values); the baseline under 1 s.
    ttft = [_series("kvbuffer_request_time_to_first_token_seconds_bucket", {**at, "pod": "a", "le": le}, values)
            for le, values in (("1", "0x40"), ("5", "0x40"), ("10", "0+10x40"), ("+Inf", "0+10x40"))]
    ttft += [_series("kvbuffer_request_time_to_first_token_seconds_bucket",
                     {"namespace": ns, "service": base, "pod": "b", "le": le}, "0+10x40")
             for le in ("1", "5", "10", "+Inf")]
    replicas = [_series("kvbuffer_operator_desired_replicas", {"namespace": ns, "kvbufferservice": kv}, "3x40"),
                _series("kvbuffer_operator_ready_replicas", {"namespace": ns, "kvbufferservice": kv}, "1x40"),
                _series("kvbuffer_operator_desired_replicas", {"namespace": ns, "kvbufferservice": base}, "2x40"),
                _series("kvbuffer_operator_ready_replicas", {"namespace": ns, "kvbufferservice": base}, "2x40")]
    warning, critical = {"severity": "warning"}, {"severity": "critical"}
    tests = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": requests + slots + decoded + ttft + replicas,
        "alert_rule_test": [
            _alert("KVBufferRequestsRefused", "20m", {**warning, **at}),
            _alert("KVBufferEngineUnavailable", "20m",
                   {**critical, "namespace": ns, "service": base, "pod": "c"}),
            _alert("KVBufferStateSlotsNearlyExhausted", "20m", {**warning, **at, "pod": "a"}),
            _alert("KVBufferTimeToFirstTokenHigh", "20m", {**warning, **at}),
            _alert("KVBufferReplicasNotReady", "20m", {**warning, "namespace": ns, "kvbufferservice": kv}),
            _alert("KVBufferDecodingMostlyRecurrent", "20m"),  # not yet: it must hold for 30 minutes
            _alert("KVBufferDecodingMostlyRecurrent", "50m", {**warning, **at}),
            _alert("KVBufferReplicasNotReady", "5m"),  # not yet: 15 minutes
        ],
    }]}
    unit = tmp_path / "rules_test.yaml"
    unit.write_text(yaml.safe_dump(tests))
    result = _promtool("test", "rules", str(unit))
    assert result.returncode == 0, result.stdout + result.stderr


def test_recurrent_alert_covers_this_releases_kvbuffer_services_only() -> None:
    (rule,) = of_kind(render(CHART / "ci" / "tensor-parallel-values.yaml", *ALL_ON), "PrometheusRule")
    (alert,) = [r for g in rule["spec"]["groups"] for r in g["rules"]
                if r.get("alert") == "KVBufferDecodingMostlyRecurrent"]
    assert set(re.findall(r'service=~"([^"]+)"', alert["expr"])) == {"qwen3-next-80b"}


def test_server_monitor_selects_every_server_service_once(tmp_path: Path) -> None:
    objects = render(CHART / "ci" / "operator-off-values.yaml", *ALL_ON)
    (monitor,) = [m for m in of_kind(objects, "ServiceMonitor") if m["metadata"]["name"].endswith("-servers")]
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["endpoints"]
    (drop,) = endpoint["relabelings"]
    selected = [s for s in of_kind(objects, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert len(selected) == 2  # the ClusterIP Service and the headless one
    scraped = [s for s in selected if not re.fullmatch(drop["regex"], s["metadata"]["name"])]
    assert [s["spec"].get("clusterIP") for s in scraped] == [None]
    assert endpoint["port"] in {p["name"] for p in scraped[0]["spec"]["ports"]}
    # The operator's Services carry the pods' labels (CONTRACTS.md) and are named NAME, NAME-headless.
    operator_labels = {"app.kubernetes.io/name": "kvbuffer", "app.kubernetes.io/instance": "qwen",
                       "app.kubernetes.io/component": "server", "app.kubernetes.io/managed-by": "kvbuffer-operator"}
    assert selector.items() <= operator_labels.items()
    assert re.fullmatch(drop["regex"], "qwen-headless") and not re.fullmatch(drop["regex"], "qwen")


def test_operator_monitor_keeps_the_kvbufferservices_namespace() -> None:
    objects = render(None, *ALL_ON)
    (monitor,) = [m for m in of_kind(objects, "ServiceMonitor") if m["metadata"]["name"].endswith("-operator")]
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    (service,) = [s for s in of_kind(objects, "Service") if s["metadata"]["name"].endswith("-operator")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 9465


def test_dashboard_configmap_carries_the_json_unchanged() -> None:
    (config,) = of_kind(render(CHART / "ci" / "single-gpu-values.yaml"), "ConfigMap")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config["metadata"]["annotations"] == {"grafana_folder": "kvbuffer"}
    shipped = (CHART / "dashboards" / "kvbuffer.json").read_text()
    assert json.loads(config["data"]["kvbuffer.json"]) == json.loads(shipped)


def test_monitoring_is_off_unless_asked() -> None:
    """Without the Prometheus operator's CRDs, ServiceMonitor objects would fail the install."""
    kinds = {o["kind"] for o in render(None)}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert CI_VALUES  # the realistic values files turn it on
