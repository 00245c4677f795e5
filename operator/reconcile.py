"""One pass of bringing a KVBufferService's objects to what its spec says: check, render, apply, record.

Level-based: it looks at the whole spec each time, never at what changed, so a pass after a restart, a retry
after a failed API call or a pass with nothing to do all converge to the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbuffer.operator import resource as r
from kvbuffer.operator.cluster import Cluster, Outcome
from kvbuffer.operator.render import config_hash, desired_objects
from kvbuffer.operator.spec import parse_spec
from kvbuffer.operator.status import set_condition


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    outcome: Outcome
    rolls: bool = False  # a Deployment whose pod template changed: its pods are replaced, none unavailable

    def describe(self) -> str:
        return f"{self.outcome} {self.kind} {self.name}" + (" (settings changed: rolling its pods, none "
                                                             "unavailable)" if self.rolls else "")


def reconcile(cluster: Cluster, name: str, namespace: str, uid: str, generation: int | None,
              raw_spec: dict[str, Any], applied_hash: str | None) -> list[Change]:
    """Apply the spec; raises SpecError (before touching anything) when the spec is invalid. Returns what changed.

    applied_hash: status.configHash, the settings the pods were last given.
    """
    spec = parse_spec(raw_spec)
    digest = config_hash(spec)
    changes = []
    for obj in desired_objects(name, namespace, uid, spec):
        outcome = cluster.apply(obj)
        if outcome != "unchanged":
            rolls = obj["kind"] == "Deployment" and outcome == "updated" and digest != applied_hash
            changes.append(Change(obj["kind"], obj["metadata"]["name"], outcome, rolls))
    cluster.patch_status(name, namespace, lambda status: {
        "observedGeneration": generation, "selector": r.selector_string(name), "configHash": digest,
        "conditions": set_condition(status.get("conditions") or [], "Degraded", False, "Applied",
                                    "the spec is applied", generation)})
    return changes


def record_failure(cluster: Cluster, name: str, namespace: str, generation: int | None, reason: str,
                   message: str) -> None:
    """Degraded=True with the reason; the objects keep what they had (an invalid edit never reaches a pod)."""
    cluster.patch_status(name, namespace, lambda status: {
        "observedGeneration": generation,
        "conditions": set_condition(status.get("conditions") or [], "Degraded", True, reason, message, generation)})
