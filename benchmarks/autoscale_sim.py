"""Autoscaling simulator: replays load traces through kvbuffer's policy and two baselines, on replicas modelled
from docs/BENCHMARKS.md, and reports SLO-violation seconds, GPU replica-seconds and scaling events.

A benchmark, not a test. The replica model (docs/AUTOSCALING.md, "How it is measured", says more):
- decode step time by path and batch: the engine table of docs/BENCHMARKS.md (H100, Qwen3-Next dimensions),
  interpolated in the batch size; a mixed batch takes the share-weighted step of its paths; one token a step;
- concurrency: 256 request slots (max_running_requests; exported as buffer slots, as the native engine's request
  slots are) and a pool of 682 state slots (8 GiB of 12 MiB checkpoints); every running request holds a request
  slot, a buffered one also a state, a recurrent one with 4 draft tokens 5 states (so 136 of them fill a replica:
  the concurrency table of docs/BENCHMARKS.md), a stateless one none;
- each replica queues up to max_waiting_requests (1024) beyond which requests are refused; requests go to the
  replica with the fewest requests in it (a least-request balancer); TTFT = queueing + one step;
- a new replica serves COLD_START_S after it is asked for; a removed one stops taking requests and finishes its
  own. GPU replica-seconds count every replica from the moment it is asked for until it is gone.
Policies see what they would in a cluster: ours scrapes each ready replica's metrics (the same ReplicaSample /
FleetScraper / decide code the operator runs) every syncPeriodSeconds; the HPA reads a Prometheus gauge scraped
every 15 s; the KPA samples concurrency every second and decides every 2 s (Knative's tick).

    python benchmarks/autoscale_sim.py                 # every trace, table to stdout
    python benchmarks/autoscale_sim.py --write-docs    # also docs/autoscaling_sim.png and the table in
                                                       # docs/AUTOSCALING.md
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import re
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kvbuffer.operator.autoscaling.config import AutoscalingSpec
from kvbuffer.operator.autoscaling.policy import PolicyState, decide
from kvbuffer.operator.autoscaling.telemetry import PATHS, FleetScraper, ReplicaSample

DOCS = Path(__file__).resolve().parent.parent / "docs"
TTFT_TARGET_S = 2.0  # the SLO: a second is violated when over 5% of the requests arriving in it wait longer
VIOLATING_SHARE = 0.05
COLD_START_S = 90.0  # schedule + load 160 GB of weights at ~2.5 GB/s + warm-up and graph capture (assumed)
DT = 0.5  # simulation step, seconds
WARMUP_S = 120.0  # policies watch the fleet fill up before their first decision
MIN_REPLICAS, MAX_REPLICAS = 1, 16

# docs/BENCHMARKS.md, "Engine": decode step (ms) by path at batch 1, 8, 64, 256.
BATCHES = np.array([1.0, 8.0, 64.0, 256.0])
STEP_MS = {"stateless": np.array([2.68, 3.32, 4.31, 7.07]), "buffered": np.array([2.67, 3.40, 4.93, 9.51]),
           "recurrent": np.array([2.39, 3.40, 5.12, 10.38])}
MAX_RUNNING, MAX_WAITING = 256, 1024
STATE_SLOTS, BUFFER_SLOTS = 682, 256
SLOTS = np.array([[0, 1], [1, 1], [5, 1]])  # (state, request) slots a request holds, by path index
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, math.inf)  # the service's (service/server/telemetry.py)
OUTPUT_TOKENS = (128, 896)  # uniform: mean 512


def step_seconds(counts: np.ndarray) -> float:
    """One decode step of a batch with counts[p] requests on path p."""
    batch = counts.sum()
    return sum(counts[i] / batch * np.interp(batch, BATCHES, STEP_MS[p]) for i, p in enumerate(PATHS)) / 1000


class Replica:
    """One simulated `kvbuffer serve`: a FIFO queue, running requests, and the counters /metrics would show."""

    def __init__(self, ready_at: float) -> None:
        self.ready_at = ready_at
        self.draining = False
        self.queue: deque[tuple[float, int, int]] = deque()  # (arrival, path index, output tokens)
        self.remaining = np.zeros(0)
        self.path = np.zeros(0, dtype=np.int64)
        self.arrival = np.zeros(0)
        self.length = np.zeros(0)
        self.slots = np.zeros(2, dtype=np.int64)
        self.decoded = np.zeros(3)
        self.first_token = np.zeros(0)
        self.output_tokens = self.finished = self.ok = self.refused = self.tpot_sum = 0.0
        self.ttft_sum = 0.0
        self.ttft_counts = np.zeros(len(TTFT_BUCKETS))

    def in_system(self) -> int:
        return len(self.remaining) + len(self.queue)

    def offer(self, now: float, path: int, tokens: int, slo: SloBook) -> None:
        if len(self.queue) >= MAX_WAITING:
            self.refused += 1
            self.finished += 1
            slo.miss(now)
        else:
            self.queue.append((now, path, tokens))

    def advance(self, now: float, slo: SloBook) -> None:
        """Admits what fits, then decodes DT seconds."""
        admitted: list[tuple[float, int, int]] = []
        while self.queue and len(self.remaining) + len(admitted) < MAX_RUNNING:
            need = SLOTS[self.queue[0][1]]
            if self.slots[0] + need[0] > STATE_SLOTS or self.slots[1] + need[1] > BUFFER_SLOTS:
                break
            self.slots += need
            admitted.append(self.queue.popleft())
        if admitted:
            arrival, path, length = (np.array(column, dtype=float) for column in zip(*admitted, strict=True))
            self.remaining = np.concatenate([self.remaining, length])
            self.path = np.concatenate([self.path, path.astype(np.int64)])
            self.arrival = np.concatenate([self.arrival, arrival])
            self.length = np.concatenate([self.length, length])
        if not len(self.remaining):
            return
        counts = np.bincount(self.path, minlength=3)
        step = step_seconds(counts)
        if admitted:
            self.first_token = np.concatenate([self.first_token, np.full(len(arrival), now + step)])
            ttft = now - arrival + step
            self.ttft_sum += ttft.sum()
            self.ttft_count_add(ttft)
            for a, t in zip(arrival, ttft, strict=True):
                slo.first_token(a, t)
        done_tokens = np.minimum(self.remaining, DT / step)
        self.decoded += np.bincount(self.path, weights=done_tokens, minlength=3)
        self.remaining = self.remaining - done_tokens
        done = self.remaining <= 0
        if done.any():
            n = int(done.sum())
            self.finished += n
            self.ok += n
            self.output_tokens += self.length[done].sum()
            self.tpot_sum += ((now + DT - self.first_token[done]) / (self.length[done] - 1)).sum()
            self.slots -= SLOTS[self.path[done]].sum(axis=0)
            keep = ~done
            self.remaining, self.path = self.remaining[keep], self.path[keep]
            self.arrival, self.length = self.arrival[keep], self.length[keep]
            self.first_token = self.first_token[keep]

    def ttft_count_add(self, ttft: np.ndarray) -> None:
        self.ttft_counts += np.bincount(np.searchsorted(TTFT_BUCKETS, ttft), minlength=len(TTFT_BUCKETS))

    def sample(self, at: float) -> ReplicaSample:
        """What GET /metrics would return now."""
        counts = np.bincount(self.path, minlength=3) if len(self.path) else np.zeros(3)
        cumulative = np.cumsum(self.ttft_counts)
        return ReplicaSample(
            at=at, decoded_tokens=dict(zip(PATHS, self.decoded.tolist(), strict=True)),
            output_tokens=self.output_tokens, requests_finished=self.finished, requests_ok=self.ok,
            requests_refused=self.refused, tpot_sum=self.tpot_sum, tpot_count=self.ok, ttft_sum=self.ttft_sum,
            ttft_count=float(cumulative[-1]), ttft_buckets=tuple(zip(TTFT_BUCKETS, cumulative.tolist(), strict=True)),
            running=float(counts.sum()), waiting=float(len(self.queue)), inflight=float(self.in_system()),
            state_slots_used=float(self.slots[0]), state_slots_total=STATE_SLOTS,
            buffer_slots_used=float(self.slots[1]), buffer_slots_total=BUFFER_SLOTS)


@dataclass
class SloBook:
    """Per arrival second: requests, and those whose first token came later than the target (or never)."""

    seconds: int
    arrivals: np.ndarray = field(init=False)
    misses: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.arrivals = np.zeros(self.seconds)
        self.misses = np.zeros(self.seconds)

    def arrived(self, at: float, n: int) -> None:
        self.arrivals[min(int(at), self.seconds - 1)] += n

    def first_token(self, arrival: float, ttft: float) -> None:
        if ttft > TTFT_TARGET_S:
            self.miss(arrival)

    def miss(self, arrival: float) -> None:
        self.misses[min(int(arrival), self.seconds - 1)] += 1

    def violated(self) -> np.ndarray:
        return self.misses > VIOLATING_SHARE * np.maximum(self.arrivals, 1)


class Fleet:
    def __init__(self, replicas: int) -> None:
        self.replicas = [Replica(ready_at=0.0) for _ in range(replicas)]
        self.replica_seconds = 0.0

    @property
    def counted(self) -> list[Replica]:
        """The Deployment's replicas: starting and ready, not those terminating."""
        return [r for r in self.replicas if not r.draining]

    def ready(self, now: float) -> list[Replica]:
        return [r for r in self.counted if r.ready_at <= now]

    def scale(self, desired: int, now: float) -> None:
        counted = self.counted
        if desired > len(counted):
            self.replicas += [Replica(ready_at=now + COLD_START_S) for _ in range(desired - len(counted))]
        # a Deployment deletes unready pods first, then (approximately) the least busy
        removed = sorted(counted, key=lambda r: (r.ready_at <= now, r.in_system()))[:max(0, len(counted) - desired)]
        for replica in removed:
            replica.draining = True

    def route(self, now: float, paths: np.ndarray, lengths: np.ndarray, slo: SloBook) -> None:
        ready = self.ready(now)
        if not ready:
            for _ in range(len(paths)):
                slo.miss(now)
            return
        heap = [(r.in_system(), i) for i, r in enumerate(ready)]
        heapq.heapify(heap)
        for p, n in zip(paths.tolist(), lengths.tolist(), strict=True):
            load, i = heapq.heappop(heap)
            ready[i].offer(now, p, n, slo)
            heapq.heappush(heap, (load + 1, i))

    def advance(self, now: float, slo: SloBook) -> None:
        for replica in self.replicas:
            if replica.ready_at <= now:
                replica.advance(now, slo)
        self.replica_seconds += DT * len(self.replicas)
        self.replicas = [r for r in self.replicas if not (r.draining and (r.in_system() == 0 or r.ready_at > now))]


# Policies -------------------------------------------------------------------------------------------------------

class Policy:
    name: str
    period: float

    def observe(self, fleet: Fleet, now: float) -> None:
        """Called every DT: policies that sample more often than they decide keep their samples here."""

    def desired(self, fleet: Fleet, now: float) -> int:
        raise NotImplementedError


class KVBufferPolicy(Policy):
    """Ours: the operator's scrape -> FleetObservation -> decide loop, state kept as the CR status keeps it."""

    name = "kvbuffer"

    def __init__(self, spec: AutoscalingSpec) -> None:
        self.spec = spec
        self.period = spec.sync_period_seconds
        self.state = PolicyState()
        self._now = 0.0
        self._fleet: Fleet | None = None
        self.scraper = FleetScraper(fetch=self._fetch, max_workers=1)

    def _fetch(self, key: str) -> ReplicaSample:
        assert self._fleet is not None
        return self._by_id[key].sample(self._now)

    def desired(self, fleet: Fleet, now: float) -> int:
        self._now, self._fleet = now, fleet
        self._by_id = {str(id(r)): r for r in fleet.ready(now)}
        observation = self.scraper.observe({k: k for k in self._by_id}, replicas=len(fleet.counted))
        decision = decide(self.spec, observation, PolicyState.from_status(self.state.to_status()), now)
        self.state = decision.state
        return decision.replicas


class HpaOnWaiting(Policy):
    """Kubernetes HPA (autoscaling/v2 defaults) on sum(waiting requests), AverageValue 5 per replica, as the vLLM
    production stack's KEDA ScaledObject ships it: desired = ceil(metric / 5) outside a 10% tolerance; scale-up
    at most max(2x, +4) per 15 s; scale-down to the highest recommendation of 300 s. The metric is what
    Prometheus scraped last (every 15 s)."""

    name = "HPA (waiting, 5)"
    period = 15.0
    target, tolerance, window = 5.0, 0.1, 300.0

    def __init__(self, start: int) -> None:
        self.scraped = 0.0
        self.scraped_at = -math.inf
        self.recommendations: deque[tuple[float, int]] = deque([(0.0, start)])  # as if it had run at `start`

    def observe(self, fleet: Fleet, now: float) -> None:
        if now - self.scraped_at >= 15.0:
            self.scraped, self.scraped_at = float(sum(len(r.queue) for r in fleet.ready(now))), now

    def desired(self, fleet: Fleet, now: float) -> int:
        current = len(fleet.counted)
        ratio = self.scraped / (self.target * current)
        recommendation = current if abs(ratio - 1) <= self.tolerance else math.ceil(self.scraped / self.target)
        recommendation = min(max(recommendation, MIN_REPLICAS), MAX_REPLICAS)
        self.recommendations.append((now, recommendation))
        while self.recommendations[0][0] <= now - self.window:
            self.recommendations.popleft()
        if recommendation > current:
            return min(recommendation, max(2 * current, current + 4), MAX_REPLICAS)
        return max(min(current, max(r for _, r in self.recommendations)), MIN_REPLICAS)


class AibrixKpa(Policy):
    """AIBrix's KPA (Knative's algorithm): concurrency (running + waiting) of the ready pods sampled every second,
    averaged over a 60 s stable and a 6 s panic window; target 205 per pod (80% of max_running_requests, our
    headroom); panic at 2x the ready pods, no scale-down in panic; rates bounded to [ready / 2, 2 x ready] per
    decision; scale-down delay 300 s (AIBrix's default is 30 min; 300 s matches the other two policies)."""

    name = "AIBrix KPA"
    period = 2.0
    target, stable_s, panic_s, threshold, delay_s = 205.0, 60.0, 6.0, 2.0, 300.0

    def __init__(self, start: int) -> None:
        self.samples: deque[tuple[float, float]] = deque()
        # as AIBrix and Knative do: start in panic mode above one pod, so that no history means no scale-down
        self.panic_time: float | None = 0.0 if start > 1 else None
        self.max_panic = start
        self.delayed: deque[tuple[float, int]] = deque([(0.0, start)])
        self.last_sample = -math.inf

    def observe(self, fleet: Fleet, now: float) -> None:
        if now - self.last_sample >= 1.0:
            self.samples.append((now, float(sum(r.in_system() for r in fleet.ready(now)))))
            self.last_sample = now
            while self.samples[0][0] <= now - self.stable_s:
                self.samples.popleft()

    def desired(self, fleet: Fleet, now: float) -> int:
        if not self.samples:
            return len(fleet.counted)
        stable = sum(v for _, v in self.samples) / len(self.samples)
        recent = [v for t, v in self.samples if t > now - self.panic_s]
        panic = sum(recent) / len(recent)
        ready = max(1.0, float(len(fleet.ready(now))))
        up, down = math.ceil(2 * ready), math.floor(ready / 2)
        dspc, dppc = math.ceil(stable / self.target), math.ceil(panic / self.target)
        stable_pods, panic_pods = min(max(dspc, down), up), min(max(dppc, down), up)
        over = dppc / ready >= self.threshold
        if over:
            self.panic_time = now
        elif self.panic_time is not None and self.panic_time + self.stable_s < now:
            self.panic_time, self.max_panic = None, 0
        desired = stable_pods
        if self.panic_time is not None:
            self.max_panic = max(self.max_panic, stable_pods, panic_pods)
            desired = self.max_panic
        self.delayed.append((now, desired))
        while self.delayed[0][0] <= now - self.delay_s:
            self.delayed.popleft()
        return min(max(max(d for _, d in self.delayed), MIN_REPLICAS), MAX_REPLICAS)


# Traces ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trace:
    """Arrival rate (requests/s) and path mix (shares of stateless, buffered, recurrent) over time."""

    name: str
    seconds: int
    rate: Callable[[float], float]
    mix: Callable[[float], tuple[float, float, float]]


def _usual_mix(_t: float) -> tuple[float, float, float]:
    return (0.10, 0.85, 0.05)


def _ramp(t: float, t0: float, t1: float, a: float, b: float) -> float:
    return a + (b - a) * min(max((t - t0) / (t1 - t0), 0.0), 1.0)


def _shifting_mix(t: float) -> tuple[float, float, float]:
    recurrent = _ramp(t, 600, 900, 0.05, 0.75) if t < 1800 else _ramp(t, 1800, 2100, 0.75, 0.05)
    return (0.10, 0.90 - recurrent, recurrent)


TRACES = [
    Trace("flash crowd", 2700, lambda t: 300.0 if 600 <= t < 1500 else 50.0, _usual_mix),
    Trace("ramp", 3000, lambda t: _ramp(t, 300, 2100, 20.0, 420.0) if t < 2400 else 40.0, _usual_mix),
    Trace("diurnal", 3600, lambda t: 190.0 - 160.0 * math.cos(2 * math.pi * t / 3600), _usual_mix),
    Trace("path mix shift", 2700, lambda _t: 250.0, _shifting_mix),
]


def offered_replicas(rate: float, mix: tuple[float, float, float]) -> float:
    """Replicas a perfect autoscaler would run for this load at 100% (full batch, mix-weighted)."""
    shares = np.array(mix)
    full = min(MAX_RUNNING, STATE_SLOTS / max(shares @ SLOTS[:, 0], 1e-9), BUFFER_SLOTS / max(shares @ SLOTS[:, 1],
                                                                                              1e-9))
    service_s = np.mean(OUTPUT_TOKENS) * step_seconds(shares * full)
    return rate * service_s / full


@dataclass
class Result:
    trace: str
    policy: str
    violation_s: int
    replica_s: float
    ups: int
    downs: int
    reversals: int
    timeline: np.ndarray  # [seconds, 2]: replicas asked for, ready
    violated: np.ndarray


def starting_replicas(trace: Trace) -> int:
    """The fleet each run starts with: sized for the trace's first load at 80%."""
    return max(MIN_REPLICAS, math.ceil(offered_replicas(trace.rate(0), trace.mix(0)) / 0.8))


def simulate(trace: Trace, policy: Policy, seed: int) -> Result:
    rng = np.random.default_rng(seed)
    fleet = Fleet(starting_replicas(trace))
    slo = SloBook(trace.seconds)
    timeline = np.zeros((trace.seconds, 2))
    changes: list[int] = []
    next_decision = WARMUP_S
    for tick in range(int(trace.seconds / DT)):
        now = tick * DT
        n = rng.poisson(trace.rate(now) * DT)
        slo.arrived(now, n)
        paths = rng.choice(3, size=n, p=trace.mix(now))
        fleet.route(now, paths, rng.integers(*OUTPUT_TOKENS, size=n, endpoint=True), slo)
        fleet.advance(now, slo)
        policy.observe(fleet, now)
        if now >= next_decision:
            next_decision += policy.period
            current = len(fleet.counted)
            desired = policy.desired(fleet, now)
            if desired != current:
                changes.append(1 if desired > current else -1)
                fleet.scale(desired, now)
        timeline[int(now)] = (len(fleet.counted), len(fleet.ready(now)))
    for replica in fleet.replicas:  # requests still waiting at the end: late if they already waited too long
        for arrival, _p, _n in replica.queue:
            if trace.seconds - arrival > TTFT_TARGET_S:
                slo.miss(arrival)
    violated = slo.violated()
    reversals = sum(1 for a, b in itertools.pairwise(changes) if a != b)
    return Result(trace.name, policy.name, int(violated.sum()), fleet.replica_seconds, changes.count(1),
                  changes.count(-1), reversals, timeline, violated)


def policies(start: int) -> list[Policy]:
    """The three policies, each taking over a fleet of `start` replicas."""
    spec = AutoscalingSpec(enabled=True, min_replicas=MIN_REPLICAS, max_replicas=MAX_REPLICAS,
                           ttft_target_seconds=TTFT_TARGET_S)
    return [KVBufferPolicy(spec), HpaOnWaiting(start), AibrixKpa(start)]


def table(runs: list[list[Result]]) -> str:
    """One row per trace and policy: means over the seeds (the range in brackets when seeds differ)."""
    lines = ["| trace | policy | SLO-violation s | GPU replica-s | scaling events (up / down) | direction "
             "reversals (most) |", "| --- | --- | --- | --- | --- | --- |"]
    for results in runs:
        r = results[0]
        violations = [x.violation_s for x in results]
        spread = f" ({min(violations)}-{max(violations)})" if len(set(violations)) > 1 else ""
        ups, downs = (sum(getattr(x, k) for x in results) / len(results) for k in ("ups", "downs"))
        lines.append(f"| {r.trace} | {r.policy} | {sum(violations) / len(results):.0f}{spread} | "
                     f"{sum(x.replica_s for x in results) / len(results):.0f} | {ups + downs:.1f} ({ups:.1f} / "
                     f"{downs:.1f}) | {max(x.reversals for x in results)} |")
    return "\n".join(lines)


def verdict(runs: list[list[Result]]) -> list[str]:
    """Per trace: does ours have fewer violation seconds than each baseline at no more replica-seconds? On the
    means over seeds, and seed by seed."""
    def met(ours: tuple[float, float], others: list[tuple[float, float]]) -> bool:
        return all((ours[0] < v or ours[0] == v == 0) and ours[1] <= rs for v, rs in others)

    lines = []
    for trace in dict.fromkeys(results[0].trace for results in runs):
        by_policy = {results[0].policy: [(r.violation_s, r.replica_s) for r in results]
                     for results in runs if results[0].trace == trace}
        ours = by_policy.pop(KVBufferPolicy.name)
        means = met(tuple(np.mean(ours, axis=0)), [tuple(np.mean(v, axis=0)) for v in by_policy.values()])
        seeds = sum(met(ours[i], [v[i] for v in by_policy.values()]) for i in range(len(ours)))
        lines.append(f"{trace}: goal {'met' if means else 'MISSED'} on the means, in {seeds} of {len(ours)} seeds")
    return lines


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(TRACES), 1, figsize=(11, 3.2 * len(TRACES)), constrained_layout=True)
    colors = {"kvbuffer": "tab:green", HpaOnWaiting.name: "tab:orange", AibrixKpa.name: "tab:blue"}
    for ax, trace in zip(axes, TRACES, strict=True):
        seconds = np.arange(trace.seconds)
        ideal = [offered_replicas(trace.rate(t), trace.mix(t)) for t in seconds]
        ax.plot(seconds, ideal, color="black", lw=1, ls="--", label="offered load (replicas at 100%)")
        for k, result in enumerate(r for r in results if r.trace == trace.name):  # the first seed
            color = colors[result.policy]
            ax.plot(seconds, result.timeline[:, 0], color=color, lw=1.5,
                    label=f"{result.policy}: {result.violation_s} s over SLO, {result.replica_s:.0f} replica-s")
            bad = seconds[result.violated]
            ax.plot(bad, np.full(len(bad), -0.4 - 0.35 * k), "|", color=color, ms=6)
        ax.set_title(trace.name)
        ax.set_ylabel("replicas")
        ax.set_ylim(-1.6, MAX_REPLICAS + 1)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel(f"seconds (ticks under the axis: seconds over the TTFT target of {TTFT_TARGET_S:g} s)")
    fig.savefig(path, dpi=110)


def write_table(markdown: str, path: Path) -> None:
    """Replaces the block between the simulator's markers in docs/AUTOSCALING.md."""
    text = path.read_text()
    begin, end = "<!-- autoscale_sim table begin -->", "<!-- autoscale_sim table end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: markers {begin} / {end} not found")
    block = f"{begin}\n{markdown}\n{end}"
    path.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S))


def run(trace_name: str, policy_index: int, seed: int) -> Result:
    trace = next(t for t in TRACES if t.name == trace_name)
    return simulate(trace, policies(starting_replicas(trace))[policy_index], seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="runs per trace and policy (seeds 0, 1, ...)")
    parser.add_argument("--jobs", type=int, default=1, help="simulations run in parallel processes")
    parser.add_argument("--traces", nargs="*", default=[t.name for t in TRACES], help="names of traces to run")
    parser.add_argument("--write-docs", action="store_true", help="write docs/autoscaling_sim.png and the table "
                                                                  "into docs/AUTOSCALING.md")
    args = parser.parse_args()
    jobs = [(t.name, p, seed) for t in TRACES if t.name in args.traces for p in range(3) for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as pool:
        flat = list(pool.map(run, *zip(*jobs, strict=True)))
    runs = [flat[i:i + args.seeds] for i in range(0, len(flat), args.seeds)]
    markdown = table(runs)
    print(f"{args.seeds} seeds; TTFT target {TTFT_TARGET_S:g} s; cold start {COLD_START_S:g} s")
    print(markdown)
    print("\n".join(verdict(runs)))
    if args.write_docs:
        plot([results[0] for results in runs], DOCS / "autoscaling_sim.png")
        write_table(markdown + "\n\n" + "; ".join(verdict(runs)) + ".", DOCS / "AUTOSCALING.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
