"""The autoscaling loop end to end against real replicas: two `kvbuffer serve` processes (the embedded tiny
model on CPU, loopback, free ports) stand in for a KVBufferService's pods; benchmarks/load_test.py drives them;
the operator's scrape -> decide loop (FleetScraper over HTTP, the pure policy, the state carried as the CR
status carries it) runs here with windows of seconds. Kubernetes itself is not in the loop: the 'pods' become
ready because the test says so (the operator's kmock tests cover the Kubernetes side).

Checks that decisions follow the load: up under load (with tokens decoded on the buffered path), never down
while a ready replica's metrics are stale (it is stopped with SIGSTOP, so its scrapes time out: MetricsAvailable
false), down once it answers again, the load is gone and the stabilization window has passed.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from kvbuffer.operator.autoscaling.config import AutoscalingSpec
from kvbuffer.operator.autoscaling.policy import Decision, PolicyState, decide
from kvbuffer.operator.autoscaling.telemetry import FleetScraper, scrape

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"serving \S+ on (\S+):(\d+) .*metrics on (http://\S+/metrics)")
# Two running requests a replica; contexts past 16 tokens decode on the buffered path (load_test sends 24 + 24).
SERVE_FLAGS = ["--device", "cpu", "--max-running-requests", "2", "--max-waiting-requests", "32",
               "--buffer-size", "16", "--chunk-size", "8", "--shutdown-grace-period-s", "2"]
SPEC = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=6, stable_window_seconds=2,
                       panic_window_seconds=1, scale_down_stabilization_seconds=3, metrics_staleness_seconds=2)


@dataclass
class Replica:
    process: subprocess.Popen[str]
    target: str
    metrics_url: str


def _start(name: str) -> Replica:
    process = subprocess.Popen([sys.executable, "-m", "kvbuffer.service.cli", "serve", "--host", "127.0.0.1",
                                "--port", "0", "--metrics-port", "0", *SERVE_FLAGS],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert process.stderr is not None
    for line in process.stderr:
        if match := LISTENING.search(line):
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe flowing
            return Replica(process, f"{match.group(1)}:{match.group(2)}", match.group(3))
    raise AssertionError(f"{name}: kvbuffer serve exited with status {process.wait()} before serving")


@pytest.fixture(scope="module")
def replicas() -> Iterator[dict[str, Replica]]:
    names = ("pod-a", "pod-b")
    with ThreadPoolExecutor(len(names)) as pool:
        started = dict(zip(names, pool.map(_start, names), strict=True))
    yield started
    for replica in started.values():
        replica.process.terminate()
    for replica in started.values():
        replica.process.wait(30)


class Operator:
    """The operator's autoscaling round without Kubernetes: scrape the ready pods, decide, keep state as status."""

    def __init__(self, replicas: int) -> None:
        self.scraper = FleetScraper(fetch=lambda url: scrape(url, timeout_s=0.5))
        self.replicas = replicas
        self.status: dict[str, object] = {}
        self.decisions: list[Decision] = []

    def round(self, ready: dict[str, Replica]) -> Decision:
        observation = self.scraper.observe({name: r.metrics_url for name, r in ready.items()}, self.replicas)
        decision = decide(SPEC, observation, PolicyState.from_status(self.status), time.time())
        self.status = decision.state.to_status()
        self.replicas = decision.replicas
        self.decisions.append(decision)
        return decision


def _load(target: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--target", target,
                             "--clients", "6", "--duration", "6", "--max-new-tokens", "24", "--prompt-chars", "24"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def test_decisions_follow_load_staleness_and_quiet(replicas: dict[str, Replica]) -> None:
    a, b = replicas["pod-a"], replicas["pod-b"]
    operator = Operator(replicas=2)
    serving = {"pod-a": a, "pod-b": b}
    for _ in range(2):  # idle: two rounds give rates; nothing asks for more
        assert operator.round(serving).direction != "up"
        time.sleep(0.5)

    loads = [_load(a.target), _load(b.target)]
    while any(load.poll() is None for load in loads):
        operator.round(serving)
        time.sleep(1.0)
    for load in loads:
        output = load.communicate()[0]
        assert load.returncode == 0, output
    under_load = operator.decisions[2:]
    ups = [d for d in under_load if d.direction == "up"]
    assert ups, [d.message for d in under_load]
    assert ups[0].reason in ("ScaleUp", "PanicScaleUp") and ups[0].replicas > 2
    busiest = max((d.summary for d in under_load if d.summary), key=lambda s: s.demand_concurrency)
    assert busiest.running > 0 and busiest.decode_tokens_per_s["buffered"] > 0
    assert busiest.demand_concurrency > 2 * (busiest.capacity_concurrency or 0) * SPEC.target_utilization
    peak = operator.replicas
    assert peak > 2

    b.process.send_signal(signal.SIGSTOP)  # pod-b hangs but still counts as ready: its metrics grow stale
    try:
        time.sleep(SPEC.metrics_staleness_seconds)
        stale_until = time.time() + SPEC.scale_down_stabilization_seconds + 1
        while time.time() < stale_until:  # the load is gone and the window passes: still no scale-down
            decision = operator.round(serving)
            assert decision.direction != "down", decision.message
        assert decision.metrics_available is False and "pod-b" in operator.scraper.errors
        assert decision.reason == "ScaleDownBlocked" and "missing or stale" in decision.message
    finally:
        b.process.send_signal(signal.SIGCONT)

    deadline = time.time() + 15
    while operator.replicas > SPEC.min_replicas and time.time() < deadline:
        operator.round(serving)
        time.sleep(0.5)
    downs = [d for d in operator.decisions if d.direction == "down"]
    assert operator.replicas == SPEC.min_replicas, [d.message for d in operator.decisions[-5:]]
    assert downs and all(d.reason == "ScaleDown" and d.metrics_available for d in downs)
    assert all(d.replicas >= d.current / SPEC.max_scale_down_rate for d in downs)  # bounded steps
