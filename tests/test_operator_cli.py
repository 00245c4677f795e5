"""`kvbuffer operator` as a user runs it: flags from the settings model, one-line errors, and the whole process
against kmock's emulated API: peering (leader election) object created and kept alive, a KVBufferService
reconciled, /healthz and the operator's /metrics served, SIGTERM ends it cleanly, and every API call it made is
one the RBAC rules (kvbuffer.operator.rbac) allow."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from kvbuffer.operator import metrics, peering
from kvbuffer.service.cli import build_parser, main
from operator_emulator import (
    NAMESPACE,
    Cluster,
    emulated_api,
    free_port,
    operator_calls,
    rbac_allowed,
    wait_for,
)


def test_help_lists_the_operator_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "--help"])
    text = capsys.readouterr().out
    for flag in ("--namespace", "--all-namespaces", "--standalone", "--peering", "--priority", "--health-port",
                 "--metrics-port", "--retry-seconds", "KVBUFFER_OPERATOR_NAMESPACE"):
        assert flag in text


@pytest.mark.parametrize(("argv", "setting"), [
    (["--health-port", "0"], "health_port"),
    (["--retry-seconds", "-1"], "retry_seconds"),
    (["--all-namespaces", "--namespace", "a"], "namespace and all_namespaces exclude each other"),
])
def test_bad_settings_end_with_one_line(argv: list[str], setting: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbuffer operator: error:") and setting in lines[0]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


@pytest_asyncio.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    async with emulated_api(tmp_path, monkeypatch) as emulated:
        yield emulated


@pytest.mark.asyncio
async def test_the_operator_process_serves_health_metrics_and_reconciles(api: Cluster) -> None:
    health, metrics_port, priority = free_port(), free_port(), 100 + uuid.uuid4().int % 1000
    process = subprocess.Popen(
        [sys.executable, "-m", "kvbuffer.service.cli", "operator", "--namespace", NAMESPACE, "--priority",
         str(priority), "--health-port", str(health), "--metrics-port", str(metrics_port)],
        env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        await wait_for(lambda: get(f"http://127.0.0.1:{health}/healthz")[0] == 200, "/healthz")
        record = await wait_for(lambda: api.object(f"{peering.GROUP}/{peering.VERSION}/kopfpeerings",
                                                   peering.NAME)["status"], "the peering record")
        assert [peer["priority"] for peer in record.values()] == [priority]

        await api.create("svc", {"model": "m", "replicas": 3}, str(uuid.uuid4()))
        await wait_for(lambda: api.object("apps/v1/deployments", "svc"), "the Deployment")
        desired = f'{metrics.DESIRED_REPLICAS}{{kvbufferservice="svc",namespace="{NAMESPACE}"}} 3.0'
        await wait_for(lambda: desired in get(f"http://127.0.0.1:{metrics_port}/metrics")[1], "the desired gauge")
        await wait_for(lambda: "MetricsAvailable" in str(api.service("svc").get("status")), "an autoscaling round")
    finally:
        process.send_signal(signal.SIGTERM)
        output = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 0, output[0][-3000:]
    assert "Traceback" not in output[0]
    calls = operator_calls(api.emulator)
    assert {("serving.kvbuffer.io", "kvbufferservices", "watch"), ("apps", "deployments", "create"),
            ("serving.kvbuffer.io", "kvbufferservices/status", "patch")} <= calls  # it did talk to the API
    assert calls <= rbac_allowed(), f"RBAC misses {calls - rbac_allowed()}"

