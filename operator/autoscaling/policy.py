"""The autoscaling policy: a pure function from (spec, observation, state, now) to a Decision.

Per decision (docs/AUTOSCALING.md has the derivation and the reasons behind each rule):

1. Capacity of one replica, two bounds. Tokens/s: 1 / sum_p(w_p / T_p), the harmonic mix of the per-path
   saturated throughputs T_p (spec prior x a factor learned online) weighted by the observed share w_p of
   decoded tokens by path. Concurrency: the requests a replica holds when its tighter slot pool is full, at the
   slots per request its running requests hold now (a recurrent request with drafts holds more state than a
   buffered one).
2. Demand, summed over replicas with fresh metrics. Concurrency: arrivals x time in service (Little's law,
   so a queue that grows during a model load is not counted again and again), plus the backlog drained within
   one stable window (dropped while replicas are starting: they will drain it). Tokens/s: arrivals x tokens per
   request, plus the same backlog term.
3. Replicas needed = max(tokens demand / tokens capacity, concurrency demand / concurrency capacity) /
   targetUtilization, a fraction; averaged over the stable window (down) and the panic window (up).
4. Recommendation: unchanged within the tolerance band, else ceil(needed): a scale-down only when the load
   fits on one replica fewer. Down moves to the highest recommendation of the stabilization window, never
   with missing or stale metrics, never in panic. Rates bounded both ways; panic (short-window need >=
   panicThreshold x replicas) lifts the up-rate bound and holds for a stable window.
5. Learning: a replica whose queue stayed non-empty over the interval (or that refused requests) is saturated;
   its decode rate is its capacity at its mix, and the per-path factors move toward it (normalized LMS).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from .config import AutoscalingSpec
from .telemetry import PATHS, FleetObservation, ReplicaLoad

DEFAULT_MIX = {"stateless": 0.0, "buffered": 1.0, "recurrent": 0.0}  # before any token is seen: KVBuffer's regime
FACTOR_BOUNDS = (0.1, 10.0)  # learned capacity stays within 10x of the prior either way
HISTORY_LIMIT = 256  # entries kept per window in the state (bounds the CR status)


class _CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class TimedValue(_CamelModel):
    at: float
    value: float


class PolicyState(_CamelModel):
    """What the policy remembers between decisions; stored in the CR status so it survives an operator restart."""

    since: float | None = None  # epoch seconds of the first decision remembered: windows are full from then on
    needs: list[TimedValue] = Field(default_factory=list)  # replicas needed, within the stable window
    recommendations: list[TimedValue] = Field(default_factory=list)  # the stabilization window's, decreasing
    panic_until: float | None = None  # epoch seconds; panic mode holds until then
    capacity_factor: dict[str, float] = Field(default_factory=lambda: dict.fromkeys(PATHS, 1.0))  # learned / prior
    mix: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MIX))  # last seen share of tokens by path
    concurrency: float | None = None  # last seen requests one replica holds with its slots full

    def to_status(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> PolicyState:
        """The state stored by to_status; a fresh one when there is none or it does not parse (a hand-edited
        status must not stop the autoscaler: it only forgets its windows and what it learned)."""
        if not status:
            return cls()
        try:
            return cls.model_validate(status)
        except ValidationError:
            return cls()


@dataclass(frozen=True)
class FleetSummary:
    """The telemetry a decision used, in the units a person reads (shown in the CR status)."""

    fresh_replicas: int
    missing_replicas: int
    decode_tokens_per_s: dict[str, float]
    running: float
    waiting: float
    refused_per_s: float
    ttft_p90_s: float | None
    demand_tokens_per_s: float
    demand_concurrency: float
    capacity_tokens_per_s: float
    capacity_concurrency: float | None
    needed: float  # replicas, this decision's own
    needed_stable: float
    needed_panic: float

    @property
    def buffered_share(self) -> float | None:
        """Share of decoded tokens served without writing state (stateless + buffered); None when idle."""
        total = sum(self.decode_tokens_per_s.values())
        if total <= 0:
            return None
        return (self.decode_tokens_per_s["stateless"] + self.decode_tokens_per_s["buffered"]) / total

    def to_status(self) -> dict[str, Any]:
        rounded = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        rounded["decode_tokens_per_s"] = {p: round(v, 1) for p, v in self.decode_tokens_per_s.items()}
        rounded["buffered_share"] = None if self.buffered_share is None else round(self.buffered_share, 3)
        return {to_camel(k): v for k, v in rounded.items()}


@dataclass(frozen=True)
class Decision:
    """Desired replicas and why. reason: one CamelCase word (a Kubernetes Event reason); message: one line."""

    replicas: int
    current: int
    reason: str
    message: str
    metrics_available: bool
    metrics_message: str
    summary: FleetSummary | None
    state: PolicyState

    @property
    def direction(self) -> Literal["up", "down"] | None:
        if self.replicas == self.current:
            return None
        return "up" if self.replicas > self.current else "down"


def decide(spec: AutoscalingSpec, observation: FleetObservation, state: PolicyState, now: float) -> Decision:
    """The replica count the fleet should have now; pure (no I/O, no clock: `now` is epoch seconds)."""
    current = observation.replicas
    bounded = min(max(current, spec.min_replicas), spec.max_replicas)
    fresh = {name: load for name, load in observation.loads.items()
             if now - load.sample.at <= spec.metrics_staleness_seconds}
    unrated = sum(1 for load in fresh.values() if load.rates is None)
    missing = max(0, observation.ready - len(fresh))
    metrics_available = missing == 0 and unrated == 0 and observation.ready > 0
    metrics_message = _metrics_message(observation.ready, missing, unrated)
    if not fresh:
        reason = "OutOfBounds" if bounded != current else "NoMetrics"
        return Decision(bounded, current, reason, f"{metrics_message}; keeping {bounded} replicas", False,
                        metrics_message, None, state)

    since = state.since if state.since is not None else now
    state = _observe(spec, list(fresh.values()), state)
    summary, needed = _needed(spec, list(fresh.values()), observation.starting, missing, state)
    needs = _within([*state.needs, TimedValue(at=now, value=needed)], now, spec.stable_window_seconds)
    stable = sum(n.value for n in needs) / len(needs)
    recent = [n.value for n in needs if now - n.at <= spec.panic_window_seconds]
    short = sum(recent) / len(recent)
    summary = replace(summary, needed_stable=stable, needed_panic=short)

    panic_until = state.panic_until if state.panic_until is not None and state.panic_until > now else None
    if current > 0 and short >= spec.panic_threshold * current:
        panic_until = now + spec.stable_window_seconds
    panic = panic_until is not None

    wanted = max(stable, short)
    within = current > 0 and abs(wanted / current - 1) <= spec.tolerance
    recommendation = current if within else math.ceil(wanted - 1e-9)
    recommendation = min(max(recommendation, spec.min_replicas), spec.max_replicas)
    # only what could still be the window's highest: older entries no higher than a newer one are dropped
    recommendations = _within([*(r for r in state.recommendations if r.value > recommendation),
                               TimedValue(at=now, value=recommendation)], now, spec.scale_down_stabilization_seconds)

    if recommendation > current:
        desired, reason, why = _scale_up(spec, current, recommendation, wanted, panic)
    else:
        slow = summary.waiting > 0 and (summary.ttft_p90_s or 0.0) > spec.ttft_target_seconds
        blocked = ("metrics are missing or stale" if not metrics_available else "panic mode holds" if panic
                   else "requests wait with TTFT over target" if slow
                   else "the stabilization window has not been observed yet"
                   if now - since < spec.scale_down_stabilization_seconds else None)
        desired, reason, why = _hold_or_scale_down(spec, current, recommendation, recommendations, wanted, blocked)
    desired = min(max(desired, spec.min_replicas), spec.max_replicas)
    if desired != current and reason in ("Steady", "ScaleDownBlocked"):
        reason, why = "OutOfBounds", f"replicas moved into [{spec.min_replicas}, {spec.max_replicas}]"
    per_slots = f" (a replica: {summary.capacity_concurrency:.1f})" if summary.capacity_concurrency else ""
    message = (f"{current} -> {desired}: {why}; demand {summary.demand_tokens_per_s:.0f} tokens/s (a replica: "
               f"{summary.capacity_tokens_per_s:.0f}), {summary.demand_concurrency:.1f} concurrent requests"
               f"{per_slots}; {metrics_message}")
    state = state.model_copy(update={"needs": needs[-HISTORY_LIMIT:], "recommendations": recommendations[
        -HISTORY_LIMIT:], "panic_until": panic_until, "since": since})
    return Decision(desired, current, reason, message, metrics_available, metrics_message, summary, state)


def _scale_up(spec: AutoscalingSpec, current: int, recommendation: int, wanted: float,
              panic: bool) -> tuple[int, str, str]:
    """Up to the recommendation, bounded per decision unless in panic."""
    limit = spec.max_replicas if panic else max(math.ceil(current * spec.max_scale_up_rate),
                                                current + spec.max_scale_up_pods)
    desired = min(recommendation, limit)
    why = f"need {wanted:.2f} replicas" + (", panic mode" if panic else "")
    if desired < recommendation:
        why += f"; at most {desired} in one step"
    return desired, "PanicScaleUp" if panic else "ScaleUp", why


def _hold_or_scale_down(spec: AutoscalingSpec, current: int, recommendation: int,
                        recommendations: list[TimedValue], wanted: float,
                        blocked: str | None) -> tuple[int, str, str]:
    """Down to the highest recommendation of the stabilization window, bounded per decision, unless blocked."""
    if recommendation >= current:
        return current, "Steady", f"need {wanted:.2f} replicas, within tolerance of {current}"
    floor = int(max(r.value for r in recommendations))
    window = f"{spec.scale_down_stabilization_seconds:g} s"
    if blocked or floor >= current:
        because = blocked or f"the last {window} recommended up to {floor}"
        return current, "ScaleDownBlocked", f"need {wanted:.2f} replicas, the load fits on {recommendation}, but " \
                                            f"{because}"
    desired = max(floor, min(current - 1, math.ceil(current / spec.max_scale_down_rate)))
    why = f"need {wanted:.2f} replicas: the load fits on {floor} (the most recommended in the last {window})"
    if desired > floor:
        why += f"; at most {current - desired} fewer in one step"
    return desired, "ScaleDown", why


def _metrics_message(ready: int, missing: int, unrated: int) -> str:
    if ready == 0:
        return "no replica is ready"
    if missing:
        return f"{missing} of {ready} ready replicas have no fresh metrics"
    if unrated:
        return f"{unrated} of {ready} ready replicas scraped once only (no rates yet)"
    return f"metrics from all {ready} ready replicas"


def _within(values: list[TimedValue], now: float, window: float) -> list[TimedValue]:
    """Entries of the last `window` seconds; the newest always stays."""
    return [v for v in values[:-1] if now - v.at < window] + values[-1:]


def _mix(loads: list[ReplicaLoad], state: PolicyState) -> dict[str, float]:
    rates = {p: sum(load.rates.decode_tokens_per_s[p] for load in loads if load.rates) for p in PATHS}
    total = sum(rates.values())
    return {p: r / total for p, r in rates.items()} if total > 0 else dict(state.mix)


def _tokens_capacity(spec: AutoscalingSpec, mix: Mapping[str, float], factor: Mapping[str, float]) -> float:
    """Saturated tokens/s of one replica at this mix: the harmonic mean of the paths' throughputs by share."""
    prior = spec.path_tokens_per_second.model_dump()
    seconds_per_token = sum(share / (prior[p] * factor.get(p, 1.0)) for p, share in mix.items())
    return 1.0 / seconds_per_token


def _saturated(spec: AutoscalingSpec, load: ReplicaLoad) -> bool:
    """Demand exceeded the replica over the interval: it refused requests, or its queue was non-empty at both
    samples, or requests waited while its TTFT was over target."""
    r, waiting = load.rates, load.sample.waiting > 0
    if r is None or r.decode_per_s <= 0:
        return False
    slow = r.ttft_p90_s is not None and r.ttft_p90_s > spec.ttft_target_seconds
    return r.refused_per_s > 0 or (waiting and (load.saturated_before or slow))


def _observe(spec: AutoscalingSpec, loads: list[ReplicaLoad], state: PolicyState) -> PolicyState:
    """The state updated with what this round shows about capacity: the path mix, the requests a replica holds
    with its slots full, and the per-path capacity factors moved toward the throughput of saturated replicas
    (normalized LMS on seconds per token: the cost predicted at the observed mix moves by capacityLearningRate of
    its error, each path in proportion to its share)."""
    update: dict[str, Any] = {"mix": _mix(loads, state)}
    holding = [load.sample for load in loads if load.sample.running > 0 and load.sample.occupancy > 0]
    if holding:
        update["concurrency"] = sum(s.running for s in holding) / sum(s.occupancy for s in holding)
    saturated = [load.rates for load in loads if _saturated(spec, load)]
    if saturated and spec.capacity_learning_rate > 0:
        prior = spec.path_tokens_per_second.model_dump()
        cost = {p: 1.0 / (prior[p] * state.capacity_factor.get(p, 1.0)) for p in PATHS}
        observed = sum(r.decode_per_s for r in saturated) / len(saturated)
        tokens = {p: sum(r.decode_tokens_per_s[p] for r in saturated) for p in PATHS}
        weights = {p: tokens[p] / sum(tokens.values()) for p in PATHS}
        error = 1.0 / observed - sum(weights[p] * cost[p] for p in PATHS)
        norm = sum(w * w for w in weights.values())
        low, high = FACTOR_BOUNDS
        factor = {}
        for p in PATHS:
            learned = cost[p] + spec.capacity_learning_rate * error * weights[p] / norm
            factor[p] = min(max(1.0 / (prior[p] * learned) if learned > 0 else high, low), high)
        update["capacity_factor"] = factor
    return state.model_copy(update=update)


def _replica_demand(load: ReplicaLoad, starting: int, drain_s: float) -> tuple[float, float]:
    """(tokens/s, concurrent requests) one replica is asked for.

    With rates: arrivals x tokens per request and arrivals x time in service, plus its queue drained within
    drain_s unless replicas are starting (they will drain it: counting a queue that grows during a model load again
    at every decision is what doubles a fleet 2 -> 4 -> 8). Not what it runs now: while a backlog drains on old
    replicas and a balancer sends the new arrivals to new ones, that would count the same work twice. Without
    rates (one sample so far): what runs and waits now."""
    s, r = load.sample, load.rates
    in_system = s.running + s.waiting
    drain = 0.0 if starting else s.waiting / drain_s
    if r is None:
        return 0.0, in_system
    concurrency = in_system if r.service_time_s is None else (r.arrivals_per_s + drain) * r.service_time_s
    if r.tokens_per_request is None:
        tokens = r.decode_per_s * (in_system / s.running if s.running > 0 and not starting else 1.0)
    else:
        tokens = (r.arrivals_per_s + drain) * r.tokens_per_request
    return tokens, concurrency


def _needed(spec: AutoscalingSpec, loads: list[ReplicaLoad], starting: int, missing: int,
            state: PolicyState) -> tuple[FleetSummary, float]:
    """Replicas needed for the demand of `loads` at the target utilization, and the summary behind it."""
    demands = [_replica_demand(load, starting, spec.stable_window_seconds) for load in loads]
    demand_tokens = sum(t for t, _ in demands)
    demand_concurrency = sum(c for _, c in demands)
    capacity_tokens = _tokens_capacity(spec, state.mix, state.capacity_factor)
    capacity_concurrency = state.concurrency
    if capacity_concurrency is None:
        totals = [load.sample.slot_capacity for load in loads if load.sample.slot_capacity > 0]
        capacity_concurrency = sum(totals) / len(totals) if totals else None
    needed = demand_tokens / capacity_tokens
    if capacity_concurrency:
        needed = max(needed, demand_concurrency / capacity_concurrency)
    needed /= spec.target_utilization
    rated = [load.rates for load in loads if load.rates]
    ttfts = [r.ttft_p90_s for r in rated if r.ttft_p90_s is not None]
    summary = FleetSummary(
        fresh_replicas=len(loads), missing_replicas=missing,
        decode_tokens_per_s={p: sum(r.decode_tokens_per_s[p] for r in rated) for p in PATHS},
        running=sum(load.sample.running for load in loads), waiting=sum(load.sample.waiting for load in loads),
        refused_per_s=sum(r.refused_per_s for r in rated), ttft_p90_s=max(ttfts) if ttfts else None,
        demand_tokens_per_s=demand_tokens, demand_concurrency=demand_concurrency,
        capacity_tokens_per_s=capacity_tokens, capacity_concurrency=capacity_concurrency,
        needed=needed, needed_stable=needed, needed_panic=needed)
    return summary, needed
