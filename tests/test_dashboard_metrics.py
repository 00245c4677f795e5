"""The Grafana dashboard and the Prometheus rules reference only series that exist: every metric name in a panel
query or a rule expression (parsed by a PromQL parser) is in a real `kvbuffer serve` /metrics scrape taken after
requests that exercise each decode path, flushes and speculation, or is one of the operator's metric names, or a
series the chart's own recording rules produce. The labels the queries match on exist on those series too."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
from helm_harness import CHART, of_kind, render
from kvbuffer.service.server.client import KVBufferClient
from prometheus_client.parser import text_string_to_metric_families
from serve_subprocess import ServeProcess

try:  # the operator's constants, where the operator package is installed (it is in the merged tree)
    from kvbuffer.operator import metrics as operator_metrics

    OPERATOR_METRICS = {operator_metrics.DESIRED_REPLICAS, operator_metrics.READY_REPLICAS,
                        operator_metrics.SCALING_EVENTS}
except ImportError:  # this list is kept in step with CONTRACTS.md by hand until then
    OPERATOR_METRICS = {"kvbuffer_operator_desired_replicas", "kvbuffer_operator_ready_replicas",
                        "kvbuffer_operator_scaling_events_total"}
OPERATOR_LABELS = {"namespace", "kvbufferservice", "direction"}
TARGET_LABELS = {"namespace", "service", "pod", "job", "instance", "endpoint", "container"}  # added by Prometheus
GRAFANA_VARIABLES = re.compile(r"\$__(rate_interval|interval|range)\b")


@pytest.fixture(scope="module")
def scrape() -> Iterator[dict[str, set[str]]]:
    """Sample name -> label names, from a server after requests that decode stateless, buffered (with flushes)
    and speculatively."""
    server = ServeProcess("--buffer-size", "16", "--chunk-size", "4", "--speculative-algorithm", "ngram",
                          "--speculative-num-draft-tokens", "2").wait_serving()
    try:
        async def exercise() -> None:
            async with KVBufferClient(server.address) as client:
                repeating = "".join(random.choice("abc") for _ in range(6)) * 8  # ngram drafts find matches
                await client.generate_unary(repeating, max_new_tokens=24, ignore_eos=True, seed=random.randint(0, 99))
                await client.generate_unary("hi", max_new_tokens=3)
                stream = client.generate("streamed", max_new_tokens=8)
                async for _response in stream:
                    pass

        asyncio.run(exercise())
        series: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(server.scrape()):
            for sample in family.samples:
                series.setdefault(sample.name, set()).update(sample.labels)
        yield series
    finally:
        server.stop()


def _selectors(node: Any) -> Iterator[promql_parser.VectorSelector]:
    """Every vector selector of a parsed PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node
        return
    if isinstance(node, promql_parser.MatrixSelector):
        yield node.vector_selector
        return
    for child in ("lhs", "rhs", "expr", "param"):
        if (value := getattr(node, child, None)) is not None:
            yield from _selectors(value)
    for argument in getattr(node, "args", None) or ():
        yield from _selectors(argument)


def _used(expressions: list[str]) -> dict[str, set[str]]:
    """Metric name -> the label names its selectors match on."""
    used: dict[str, set[str]] = {}
    for expression in expressions:
        parsed = promql_parser.parse(GRAFANA_VARIABLES.sub("5m", expression))
        for selector in _selectors(parsed):
            assert selector.name, f"a selector without a metric name in {expression}"
            used.setdefault(selector.name, set()).update(m.name for m in selector.matchers.matchers)
    return used


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((CHART / "dashboards" / "kvbuffer.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _rules() -> list[dict[str, Any]]:
    objects = render(None, "server.enabled=true", "monitoring.prometheusRule.enabled=true")
    (rule,) = of_kind(objects, "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def _check(used: dict[str, set[str]], series: dict[str, set[str]], recorded: set[str]) -> list[str]:
    problems = []
    for name, labels in sorted(used.items()):
        if name in OPERATOR_METRICS:
            unknown = labels - OPERATOR_LABELS
        elif ":" in name:
            unknown = set() if name in recorded else {"(no recording rule makes it)"}
        elif name in series:
            unknown = labels - series[name] - TARGET_LABELS
        else:
            problems.append(f"{name}: not exported by kvbuffer serve")
            continue
        problems += [f"{name}: no label {label}" for label in sorted(unknown)]
    return problems


def test_dashboard_queries_name_only_exported_series(scrape: dict[str, set[str]]) -> None:
    recorded = {r["record"] for r in _rules() if "record" in r}
    assert not _check(_used(_dashboard_queries()), scrape, recorded)


def test_rules_name_only_exported_series(scrape: dict[str, set[str]]) -> None:
    rules = _rules()
    recorded = {r["record"] for r in rules if "record" in r}
    assert not _check(_used([r["expr"] for r in rules]), scrape, recorded)


def test_a_misspelt_metric_is_caught(scrape: dict[str, set[str]]) -> None:
    """The check above can fail: a histogram named without its _bucket suffix, a made-up label, a made-up name."""
    used = _used(['histogram_quantile(0.9, sum by (le) (rate(kvbuffer_request_time_to_first_token_seconds'
                  '[$__rate_interval])))', 'sum(kvbuffer_decoded_tokens_total{mode="buffered"})',
                  'kvbuffer_buffer_slots_free'])
    assert len(_check(used, scrape, set())) == 3


def test_dashboard_has_the_panels_operators_look_at() -> None:
    dashboard = json.loads((CHART / "dashboards" / "kvbuffer.json").read_text())
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    expected = {"Requests by status", "Refused for overload", "Time to first token", "Time per output token",
                "Decoded tokens by path", "Flushes", "State and buffer slots in use", "Speculative acceptance rate",
                "Replicas desired vs ready"}
    assert expected <= panels.keys()
    assert all(p.get("description") for p in panels.values())
    assert {t["legendFormat"] for t in panels["Time to first token"]["targets"]} == {"p50", "p90", "p99"}
    used = _used([t["expr"] for t in panels["Replicas desired vs ready"]["targets"]])
    assert used.keys() == OPERATOR_METRICS - {name for name in OPERATOR_METRICS if name.endswith("_total")}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
