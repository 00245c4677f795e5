"""The autoscaling policy, table-driven: steady load, burst, ramp, a decode-path mix shifting buffered -> recurrent
and back, stale metrics, pods pending, an operator restart, no flapping, learning capacity.

Each scenario drives `decide` through decisions 15 s apart with observations from a fluid model of the fleet
(`Load`: arrivals, service time, tokens per request, path mix, queue), whose loads are drawn at random per run.
The oracle is the documented formula (docs/AUTOSCALING.md), computed here from the load model's own numbers:
replicas needed = max(arrivals x tokens / tokens capacity at the mix, arrivals x service time / slot capacity at
the mix) / targetUtilization.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
from kvbuffer.operator.autoscaling.config import AutoscalingSpec
from kvbuffer.operator.autoscaling.policy import Decision, PolicyState, decide
from kvbuffer.operator.autoscaling.telemetry import PATHS, FleetObservation, Rates, ReplicaLoad, ReplicaSample

PERIOD = 15.0
SLOTS = {"stateless": (0, 1), "buffered": (1, 1), "recurrent": (5, 0)}  # (state, buffer) slots per request
BUFFER_SLOTS = 32
STATE_SLOTS = 2 * BUFFER_SLOTS
BUFFERED = {"stateless": 0.1, "buffered": 0.9, "recurrent": 0.0}
RECURRENT = {"stateless": 0.1, "buffered": 0.1, "recurrent": 0.8}


def _spec(**overrides: object) -> AutoscalingSpec:
    values = {"enabled": True, "minReplicas": 1, "maxReplicas": 40, "syncPeriodSeconds": PERIOD,
              "stableWindowSeconds": 60, "panicWindowSeconds": 10, "scaleDownStabilizationSeconds": 120,
              "pathTokensPerSecond": {"stateless": 9000, "buffered": 6000, "recurrent": 4000}}
    return AutoscalingSpec.model_validate({**values, **overrides})


@dataclass(frozen=True)
class Load:
    """Fleet-wide load: arrivals (requests/s), each served for service_s and producing tokens; waiting requests
    per ready replica; the share of decoded tokens by path."""

    arrivals: float
    service_s: float = 8.0
    tokens: float = 400.0
    mix: tuple[tuple[str, float], ...] = tuple(BUFFERED.items())
    waiting: float = 0.0

    @property
    def shares(self) -> dict[str, float]:
        return dict(self.mix)

    def slot_capacity(self) -> float:
        """Requests one replica holds with its tighter pool full, at this mix."""
        state = sum(share * SLOTS[p][0] for p, share in self.mix)
        buffer = sum(share * SLOTS[p][1] for p, share in self.mix)
        return min(STATE_SLOTS / state if state else math.inf, BUFFER_SLOTS / buffer if buffer else math.inf)

    def needed(self, spec: AutoscalingSpec, starting: bool = False) -> float:
        """The oracle: replicas needed (a fraction), per the documented formula."""
        prior = spec.path_tokens_per_second.model_dump()
        tokens_capacity = 1 / sum(share / prior[p] for p, share in self.mix)
        drain = 0.0 if starting else self.waiting / spec.stable_window_seconds  # per replica, see observe()
        ready = max(1, self.ready)
        tokens = self.arrivals * self.tokens + ready * drain * self.tokens
        concurrency = self.arrivals * self.service_s + ready * drain * self.service_s
        return max(tokens / tokens_capacity, concurrency / self.slot_capacity()) / spec.target_utilization

    ready: int = 1  # replicas that report it (the backlog is per replica)

    def observe(self, replicas: int, ready: int, now: float, stale: int = 0, unrated: int = 0) -> FleetObservation:
        """What scraping `ready` replicas that share this load evenly shows; `stale` of them answered long ago,
        `unrated` once only."""
        per = self.arrivals / ready
        running = min(per * self.service_s, self.slot_capacity())
        loads = {}
        for i in range(ready):
            at = now - 1000.0 if i < stale else now
            sample = ReplicaSample(
                at=at, decoded_tokens={}, output_tokens=0, requests_finished=0, requests_ok=0, requests_refused=0,
                tpot_sum=0, tpot_count=0, ttft_sum=0, ttft_count=0, ttft_buckets=(), running=running,
                waiting=self.waiting, inflight=running + self.waiting,
                state_slots_used=running * sum(s * SLOTS[p][0] for p, s in self.mix), state_slots_total=STATE_SLOTS,
                buffer_slots_used=running * sum(s * SLOTS[p][1] for p, s in self.mix),
                buffer_slots_total=BUFFER_SLOTS)
            decode = running * self.tokens / self.service_s
            rates = Rates(interval_s=PERIOD, decode_tokens_per_s={p: decode * self.shares.get(p, 0.0) for p in PATHS},
                          arrivals_per_s=per, refused_per_s=0.0, tokens_per_request=self.tokens,
                          service_time_s=self.service_s, ttft_mean_s=0.2, ttft_p90_s=0.4)
            unrated_here = stale <= i < stale + unrated
            loads[f"pod-{i}"] = ReplicaLoad(sample, None if unrated_here else rates, saturated_before=False)
        return FleetObservation(replicas=replicas, ready=ready, loads=loads)


class Fleet:
    """Runs decisions PERIOD apart; replicas asked for become ready `start_delay` seconds later."""

    def __init__(self, spec: AutoscalingSpec, replicas: int, start_delay: float = 0.0, now: float = 1e6) -> None:
        self.spec, self.replicas, self.start_delay, self.now = spec, replicas, start_delay, now
        self.state = PolicyState()
        self.pending: list[tuple[float, int]] = []  # (ready at, count)
        self.ready = replicas
        self.decisions: list[Decision] = []

    def step(self, load: Load, stale: int = 0) -> Decision:
        self.now += PERIOD
        self.ready += sum(n for at, n in self.pending if at <= self.now)
        self.pending = [(at, n) for at, n in self.pending if at > self.now]
        self.ready = min(self.ready, self.replicas)
        load = replace(load, ready=self.ready)
        decision = decide(self.spec, load.observe(self.replicas, self.ready, self.now, stale=stale), self.state,
                          self.now)
        if decision.replicas > self.replicas:
            self.pending.append((self.now + self.start_delay, decision.replicas - self.replicas))
        self.replicas = decision.replicas
        self.state = decision.state
        self.decisions.append(decision)
        return decision

    def run(self, loads: Iterator[Load] | list[Load]) -> list[int]:
        return [self.step(load).replicas for load in loads]


def settled_up(count: int, need: float, spec: AutoscalingSpec) -> bool:
    """Where a count that moved up to a need stops: ceil(need), or less inside the tolerance band."""
    return need / (1 + spec.tolerance) <= count <= math.ceil(need)


def settled_down(count: int, need: float, spec: AutoscalingSpec) -> bool:
    """Where a count that moved down to a need stops: ceil(need), or more inside the tolerance band."""
    return math.ceil(need) <= count <= max(math.ceil(need), need / (1 - spec.tolerance))


def reversals(counts: list[int]) -> int:
    moves = [b - a for a, b in itertools.pairwise(counts) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


@pytest.fixture
def rng() -> random.Random:
    seed = random.randrange(2**32)
    print(f"seed {seed}")  # shown when a test fails
    return random.Random(seed)


def _load_needing(spec: AutoscalingSpec, replicas: float, rng: random.Random, **fields: object) -> Load:
    """A load whose oracle need is `replicas` (a fraction), with random request shapes."""
    shape = Load(arrivals=1.0, service_s=rng.uniform(3, 20), tokens=rng.uniform(100, 1500), **fields)
    return replace(shape, arrivals=replicas / shape.needed(spec))


# Steady load ----------------------------------------------------------------------------------------------------

def test_steady_load_keeps_the_right_count_and_an_oversized_fleet_shrinks_to_it_once(rng: random.Random) -> None:
    spec = _spec()
    need = rng.uniform(2.2, 5.6)
    load = _load_needing(spec, need, rng)
    right = math.ceil(need)
    assert Fleet(spec, right).run([load] * 30) == [right] * 30

    fleet = Fleet(spec, right + 3)
    counts = fleet.run([load] * 40)
    assert counts[-1] == right and min(counts) == right
    assert reversals(counts) == 0 and all(b <= a for a, b in itertools.pairwise(counts))
    first_down = next(i for i, c in enumerate(counts) if c < right + 3)
    assert (first_down + 1) * PERIOD >= spec.scale_down_stabilization_seconds  # not before the window is observed
    assert all(d.reason in ("ScaleDown", "ScaleDownBlocked", "Steady") for d in fleet.decisions)
    assert all(d.metrics_available for d in fleet.decisions)


# Burst ----------------------------------------------------------------------------------------------------------

def test_a_burst_panics_straight_to_its_need_and_holds_until_the_burst_has_passed(rng: random.Random) -> None:
    spec = _spec()
    calm = _load_needing(spec, rng.uniform(1.2, 1.8), rng)
    burst = replace(calm, arrivals=calm.arrivals * rng.uniform(5, 8))
    fleet = Fleet(spec, 2)
    assert fleet.run([calm] * 10) == [2] * 10
    decision = fleet.step(burst)
    assert decision.reason == "PanicScaleUp"
    assert decision.replicas == math.ceil(burst.needed(spec))  # beyond max(2 x 2, 2 + 4): panic lifts the rate bound
    burst_counts = fleet.run([burst] * 6)
    assert set(burst_counts) == {decision.replicas}
    after = fleet.run([calm] * 30)
    assert all(c == decision.replicas for c in after[:int(spec.stable_window_seconds / PERIOD)])
    assert after[-1] == 2 and reversals([2, *burst_counts, *after]) == 1
    assert (after.index(min(after)) + 1) * PERIOD > spec.scale_down_stabilization_seconds


def test_a_burst_below_the_panic_threshold_scales_up_within_the_rate_bounds(rng: random.Random) -> None:
    spec = _spec(maxScaleUpRate=1.5, maxScaleUpPods=1, panicThreshold=10)
    calm = _load_needing(spec, 3.5, rng)
    fleet = Fleet(spec, 4)
    fleet.run([calm] * 4)
    burst = replace(calm, arrivals=calm.arrivals * 4)  # needs 14: 4 -> 6 -> 9 -> 14
    assert fleet.run([burst] * 4) == [6, 9, 14, 14]
    assert {d.reason for d in fleet.decisions[4:7]} == {"ScaleUp"}


# Ramp -----------------------------------------------------------------------------------------------------------

def test_a_ramp_is_followed_upward_without_overshoot_then_given_back(rng: random.Random) -> None:
    spec = _spec()
    base = _load_needing(spec, 1.0, rng)
    top = rng.uniform(8, 14)
    ramp = [replace(base, arrivals=base.arrivals * (1 + (top - 1) * i / 40)) for i in range(41)]
    fleet = Fleet(spec, 2)
    counts = fleet.run(ramp)
    for load, count in zip(ramp, counts, strict=True):
        need = load.needed(spec)
        assert count >= need * (1 - spec.tolerance) - 1e-9  # keeps up (the load grows ~2.5% a decision)
        assert count <= math.ceil(need * (1 + spec.tolerance)) + 1  # no overshoot
    assert all(b >= a for a, b in itertools.pairwise(counts))
    down = fleet.run([base] * 30)
    assert down[-1] == 1 and reversals(counts + down) == 1


# Decode-path mix --------------------------------------------------------------------------------------------------

def test_a_shift_to_recurrent_decoding_scales_out_before_any_queue_and_back_gives_gpus_back(rng: random.Random) -> None:
    spec = _spec()
    while True:  # a shift that needs more replicas than the buffered load has, past the tolerance band
        buffered = _load_needing(spec, rng.uniform(2.2, 3.6), rng, mix=tuple(BUFFERED.items()))
        recurrent = replace(buffered, mix=tuple(RECURRENT.items()))
        if recurrent.needed(spec) / (1 + spec.tolerance) > math.ceil(buffered.needed(spec)):
            break
    assert recurrent.waiting == 0 and recurrent.needed(spec) > 1.3 * buffered.needed(spec)
    steps = 8
    shift = [replace(buffered, mix=tuple((p, BUFFERED[p] + (RECURRENT[p] - BUFFERED[p]) * i / steps) for p in PATHS))
             for i in range(steps + 1)]
    fleet = Fleet(spec, math.ceil(buffered.needed(spec)))
    counts = fleet.run([buffered] * 4 + shift + [recurrent] * 6)
    assert settled_up(counts[-1], recurrent.needed(spec), spec)  # no request ever waited: waiting = 0 throughout
    assert all(d.summary is not None and d.summary.waiting == 0 for d in fleet.decisions)
    assert all(d.direction != "down" for d in fleet.decisions)
    back = fleet.run(list(reversed(shift)) + [buffered] * 20)
    assert settled_down(back[-1], buffered.needed(spec), spec)
    assert reversals(counts + back) == 1
    share = fleet.decisions[-1].summary
    assert share is not None and share.buffered_share == pytest.approx(1.0)


# Stale and missing metrics ----------------------------------------------------------------------------------------

def test_stale_metrics_never_scale_down_and_say_so(rng: random.Random) -> None:
    spec = _spec()
    load = _load_needing(spec, rng.uniform(4.2, 5.5), rng)
    fleet = Fleet(spec, 6)
    fleet.run([load] * 3)
    idle = replace(load, arrivals=load.arrivals / 20)
    for _ in range(20):  # far past the stabilization window
        decision = fleet.step(idle, stale=1)
        assert decision.replicas == 6 and not decision.metrics_available
        assert "1 of 6 ready replicas have no fresh metrics" in decision.metrics_message
    assert decision.reason == "ScaleDownBlocked" and "missing or stale" in decision.message
    busy = replace(load, arrivals=load.arrivals * 3)
    assert fleet.step(busy, stale=2).replicas > 6  # the fresh replicas' load alone asks for more: up is allowed
    assert fleet.step(idle).metrics_available  # fresh again


def test_with_no_fresh_metrics_at_all_the_count_holds(rng: random.Random) -> None:
    spec = _spec()
    load = _load_needing(spec, 3.0, rng)
    state = PolicyState()
    decision = decide(spec, load.observe(replicas=3, ready=3, now=5000.0, stale=3), state, 5000.0)
    assert (decision.replicas, decision.reason, decision.metrics_available) == (3, "NoMetrics", False)
    assert decision.state is state and decision.summary is None
    nobody = decide(spec, FleetObservation(replicas=2, ready=0), state, 5000.0)
    assert (nobody.replicas, nobody.metrics_message) == (2, "no replica is ready")


def test_replicas_scraped_once_only_block_scale_down(rng: random.Random) -> None:
    spec = _spec(scaleDownStabilizationSeconds=0)
    load = _load_needing(spec, 1.5, rng)
    observation = load.observe(replicas=5, ready=5, now=100.0, unrated=2)
    decision = decide(spec, observation, PolicyState(), 100.0)
    assert decision.replicas == 5 and "scraped once only" in decision.metrics_message


# Pods pending -----------------------------------------------------------------------------------------------------

def test_pods_starting_count_as_capacity_on_the_way_even_while_the_queue_grows(rng: random.Random) -> None:
    spec = _spec()
    calm = _load_needing(spec, rng.uniform(1.2, 1.4), rng)
    surge = replace(calm, arrivals=calm.arrivals * 4)
    fleet = Fleet(spec, 2, start_delay=10_000.0)  # the new pods never get ready (no GPU free)
    fleet.run([calm] * 3)
    first = fleet.step(surge)
    assert first.replicas == math.ceil(surge.needed(spec)) and fleet.ready == 2
    growing = [replace(surge, waiting=w) for w in (20.0, 60.0, 150.0, 400.0, 900.0)]
    assert fleet.run(growing) == [first.replicas] * len(growing)  # no 2 -> 6 -> 12 -> 24
    assert all(d.state.needs[-1].value <= first.replicas for d in fleet.decisions[-len(growing):])


def test_a_queue_on_a_fleet_with_nothing_starting_asks_for_its_drain(rng: random.Random) -> None:
    spec = _spec(tolerance=0)
    load = replace(_load_needing(spec, 3.0, rng), waiting=rng.uniform(20, 80))
    fleet = Fleet(spec, 3)
    decision = fleet.step(load)
    assert decision.replicas == math.ceil(replace(load, ready=3).needed(spec)) > 3


# Restart ----------------------------------------------------------------------------------------------------------

def test_the_state_survives_a_restart_through_the_status(rng: random.Random) -> None:
    spec = _spec()
    low = _load_needing(spec, rng.uniform(1.2, 1.8), rng)
    loads = [low] * 5 + [replace(low, arrivals=low.arrivals * 5)] * 4 + [low] * 25
    uninterrupted = Fleet(spec, 2).run(loads)

    restarted = Fleet(spec, 2)
    counts = restarted.run(loads[:12])
    status = json.loads(json.dumps(restarted.state.to_status()))  # what the CR status holds
    assert set(status) >= {"needs", "recommendations", "panicUntil", "capacityFactor", "mix", "since"}
    restarted.state = PolicyState.from_status(status)
    counts += restarted.run(loads[12:])
    assert counts == uninterrupted

    forgetful = Fleet(spec, uninterrupted[11])  # a restart that lost its status: no scale-down until it has seen
    forgetful.now = restarted.now - len(loads[12:]) * PERIOD  # a whole stabilization window
    early = forgetful.run(loads[12:12 + int(spec.scale_down_stabilization_seconds / PERIOD) - 1])
    assert set(early) == {uninterrupted[11]}


def test_an_unreadable_status_gives_a_fresh_state() -> None:
    assert PolicyState.from_status(None) == PolicyState()
    assert PolicyState.from_status({"needs": "garbage"}) == PolicyState()
    assert PolicyState.from_status({"needs": [{"at": 1, "value": 2}]}).needs[0].value == 2


# No flapping ------------------------------------------------------------------------------------------------------

def test_noisy_load_within_the_tolerance_band_never_flaps(rng: random.Random) -> None:
    spec = _spec()
    need = rng.uniform(4.5, 5.3)
    base = _load_needing(spec, need, rng)
    noisy = [replace(base, arrivals=base.arrivals * rng.uniform(0.96, 1.04)) for _ in range(120)]
    counts = Fleet(spec, math.ceil(need)).run(noisy)
    assert reversals(counts) == 0 and len(set(counts)) <= 2


def test_bursts_closer_than_the_stabilization_window_keep_the_fleet_up(rng: random.Random) -> None:
    spec = _spec()
    calm = _load_needing(spec, 1.5, rng)
    burst = replace(calm, arrivals=calm.arrivals * 4)
    gap = int(spec.scale_down_stabilization_seconds / PERIOD) - 2
    loads = ([burst] * 2 + [calm] * gap) * 5
    counts = Fleet(spec, 2).run(loads)
    assert reversals(counts) == 0 and counts[-1] == max(counts)


# Bounds, learning -------------------------------------------------------------------------------------------------

def test_bounds_clamp_the_decision(rng: random.Random) -> None:
    spec = _spec(minReplicas=3, maxReplicas=5)
    assert Fleet(spec, 4).step(_load_needing(spec, 20.0, rng)).replicas == 5
    decision = Fleet(spec, 9).step(_load_needing(spec, 0.2, rng))  # someone scaled it by hand
    assert (decision.replicas, decision.reason) == (5, "OutOfBounds")
    assert Fleet(spec, 1).step(_load_needing(spec, 0.2, rng)).replicas == 3


def test_saturated_replicas_teach_the_capacity_of_their_path(rng: random.Random) -> None:
    spec = _spec(capacityLearningRate=rng.uniform(0.2, 0.6))
    prior = spec.path_tokens_per_second.buffered
    observed = prior * rng.uniform(0.3, 0.7)  # what a saturated replica really decodes
    state = PolicyState()
    for n in range(1, 6):
        sample = ReplicaSample(at=100.0 * n, decoded_tokens={}, output_tokens=0, requests_finished=0,
                               requests_ok=0, requests_refused=0, tpot_sum=0, tpot_count=0, ttft_sum=0, ttft_count=0,
                               ttft_buckets=(), running=8, waiting=5, inflight=13, state_slots_used=8,
                               state_slots_total=8, buffer_slots_used=8, buffer_slots_total=8)
        rates = Rates(interval_s=PERIOD, decode_tokens_per_s={"stateless": 0.0, "buffered": observed,
                                                              "recurrent": 0.0}, arrivals_per_s=1.0,
                      refused_per_s=0.0, tokens_per_request=100.0, service_time_s=8.0, ttft_mean_s=3.0,
                      ttft_p90_s=5.0)
        load = ReplicaLoad(sample, rates, saturated_before=True)
        state = decide(spec, FleetObservation(replicas=1, ready=1, loads={"p": load}), state, 100.0 * n).state
        cost = 1 / observed + (1 - spec.capacity_learning_rate) ** n * (1 / prior - 1 / observed)
        assert state.capacity_factor["buffered"] == pytest.approx(1 / (cost * prior))
        assert state.capacity_factor["recurrent"] == pytest.approx(1.0)  # no recurrent tokens: nothing learned
