"""Status rules, pure: conditions from a Deployment's status, the API's lastTransitionTime convention, and what
one autoscaling round records (history bounded, state kept only while autoscaling is on)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from kvbuffer.operator.autoscale import metrics_url, record
from kvbuffer.operator.autoscaling.policy import Decision, PolicyState
from kvbuffer.operator.status import DECISION_HISTORY, rollout_conditions, set_condition


def test_transition_time_moves_only_when_the_status_changes() -> None:
    conditions = set_condition([], "Ready", False, "NoReplicaReady", "0/2")
    conditions[0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    same = set_condition(conditions, "Ready", False, "PartiallyReady", "1/2")
    assert same[0]["lastTransitionTime"] == "2020-01-01T00:00:00Z" and same[0]["reason"] == "PartiallyReady"
    flipped = set_condition(same, "Ready", True, "AllReplicasReady")
    assert flipped[0]["lastTransitionTime"] != "2020-01-01T00:00:00Z"
    both = set_condition(flipped, "Degraded", None, "Unknown")
    assert [c["type"] for c in both] == ["Ready", "Degraded"] and both[1]["status"] == "Unknown"


ROLLOUTS = [  # deployment status, generation, wanted -> Ready (status, reason), Progressing status
    ({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 3}, 2, 3,
     (True, "AllReplicasReady"), False),
    ({"observedGeneration": 2, "replicas": 4, "updatedReplicas": 1, "readyReplicas": 3}, 2, 3,
     (True, "AllReplicasReady"), True),  # a settings roll: old pods serve while the new one starts
    ({"observedGeneration": 1, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 3}, 2, 3,
     (True, "AllReplicasReady"), True),  # the controller has not seen the new template yet
    ({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 1}, 3, 3,
     (False, "PartiallyReady"), True),
    ({}, 1, 2, (False, "NoReplicaReady"), True),
    ({"observedGeneration": 1}, 1, 0, (True, "ScaledToZero"), False),
]


@pytest.mark.parametrize(("deployment", "generation", "wanted", "ready", "progressing"), ROLLOUTS)
def test_rollout_conditions(deployment: dict, generation: int, wanted: int, ready: tuple, progressing: bool) -> None:
    (ready_type, ready_status, ready_reason, _), (progress_type, progress_status, _, _) = \
        rollout_conditions(deployment, generation, wanted)
    assert (ready_type, progress_type) == ("Ready", "Progressing")
    assert (ready_status, ready_reason) == ready
    assert progress_status == progressing


def decision(current: int, replicas: int, reason: str = "ScaleUp") -> Decision:
    return Decision(replicas=replicas, current=current, reason=reason, message=f"{current} -> {replicas}",
                    metrics_available=True, metrics_message="metrics from all ready replicas", summary=None,
                    state=PolicyState(since=random.uniform(1e9, 2e9)))


def test_record_keeps_a_bounded_history_of_changes_and_the_state() -> None:
    status: dict = {}
    current = 1
    for _ in range(DECISION_HISTORY + 5):
        step = decision(current, current + random.randint(1, 3))
        status.update(record(status, step, enabled=True, generation=4))
        current = step.replicas
        status.update(record(status, replace(step, current=current, reason="Steady"), enabled=True, generation=4))
    decisions = status["autoscaling"]["decisions"]
    assert len(decisions) == DECISION_HISTORY
    assert decisions[-1]["toReplicas"] == current and all(d["reason"] == "ScaleUp" for d in decisions)
    assert PolicyState.from_status(status["autoscaling"]["state"]).since == step.state.since
    active = next(c for c in status["conditions"] if c["type"] == "ScalingActive")
    assert (active["status"], active["reason"]) == ("True", "Steady")


def test_record_with_autoscaling_off_keeps_no_state() -> None:
    fields = record({}, decision(2, 4), enabled=False, generation=1)
    assert "autoscaling" not in fields
    active = next(c for c in fields["conditions"] if c["type"] == "ScalingActive")
    assert (active["status"], active["reason"]) == ("False", "AutoscalingDisabled")


def test_metrics_url_uses_the_named_container_port() -> None:
    port = random.randint(1024, 65535)
    pod = {"spec": {"containers": [{"ports": [{"name": "grpc", "containerPort": 50051},
                                              {"name": "metrics", "containerPort": port}]}]},
           "status": {"podIP": "10.1.2.3"}}
    assert metrics_url(pod) == f"http://10.1.2.3:{port}/metrics"
    assert metrics_url({"spec": pod["spec"], "status": {}}) is None
