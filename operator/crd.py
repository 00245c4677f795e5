"""The KVBufferService CustomResourceDefinition, generated: `python -m kvbuffer.operator.crd > FILE`.

Every schema comes from a model that code also uses: the spec from KVBufferServiceSpec, `spec.settings` from the
service's ServiceSettings (the settings a CR may carry), `spec.autoscaling` from AutoscalingSpec, the status from
KVBufferServiceStatus. Cross-field rules are CEL (`x-kubernetes-validations`), so the API server refuses a bad
edit before the operator sees it; the operator checks the same rules again (parse_spec), since a CEL rule can
only approximate the server's own checks.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from kvbuffer.operator import resource as r
from kvbuffer.operator.autoscaling.config import AutoscalingSpec
from kvbuffer.operator.openapi import structural
from kvbuffer.operator.spec import CR_SETTINGS, KVBufferServiceSpec
from kvbuffer.operator.status import KVBufferServiceStatus
from kvbuffer.service.engine.config import DEFAULT_MODEL
from kvbuffer.service.server.settings import ServiceSettings
from pydantic import BaseModel

FILE = f"deploy/helm/kvbuffer/crds/{r.PLURAL}.{r.GROUP}.yaml"  # relative to the repository root


def _value(model: type[BaseModel], name: str, key: str | None = None, parent: str | None = None) -> str:
    """CEL for a field's value, the model's default when the object leaves it unset (CEL sees no defaults);
    `parent`: the field sits in that object field of `self`, which may itself be unset."""
    default = model.model_fields[name].default
    literal = f"'{default}'" if isinstance(default, str) else str(default).lower()
    key = key or name
    if parent is None:
        return f"(has(self.{key}) ? self.{key} : {literal})"
    return f"(has(self.{parent}) && has(self.{parent}.{key}) ? self.{parent}.{key} : {literal})"


def _setting(name: str) -> str:
    return _value(ServiceSettings, name, parent="settings")


def settings_rules() -> list[dict[str, str]]:
    """The service's cross-setting checks as CEL on the spec, with the service's defaults filled in. They depend on
    the engine: the native one checks chunk_size + drafts <= buffer_size and speculates only with decode_mode
    kvbuffer (EngineConfig); SGLang verifies the drafts together with the token before them, so its buffer must
    hold one more, checks the buffer only with decode_mode kvbuffer, speculates in the recurrent baseline too,
    and serves a model directory on GPUs (kvbuffer.service.sglang.settings.check_settings)."""
    engine = _value(KVBufferServiceSpec, "engine")
    native, sglang = f"{engine} != 'sglang'", f"{engine} == 'sglang'"
    speculating = f"{_setting('speculative_algorithm')} != 'none'"
    drafts = _setting("speculative_num_draft_tokens")
    kvbuffer = f"{_setting('decode_mode')} == 'kvbuffer'"
    chunk, buffer = _setting("chunk_size"), _setting("buffer_size")
    embedded = DEFAULT_MODEL.split(":")[0] + ":"
    return [
        {"rule": f"{sglang} || {chunk} + ({speculating} ? {drafts} : 0) <= {buffer}",
         "message": "chunk_size + speculative_num_draft_tokens must be <= buffer_size",
         "fieldPath": ".settings.chunk_size"},
        {"rule": f"{native} || !({kvbuffer}) || {chunk} + ({speculating} ? {drafts} + 1 : 0) <= {buffer}",
         "message": "with engine sglang and decode_mode kvbuffer, chunk_size + speculative_num_draft_tokens + 1 "
                    "must be <= buffer_size (SGLang verifies the drafts together with the token before them)",
         "fieldPath": ".settings.chunk_size"},
        {"rule": f"{sglang} || !({speculating}) || {kvbuffer}",
         "message": "speculative decoding needs decode_mode kvbuffer on engine native",
         "fieldPath": ".settings.speculative_algorithm"},
        {"rule": f"{sglang} || {_setting('speculative_algorithm')} in ['none', 'ngram']",
         "message": "speculative_algorithm nextn, eagle and eagle3 need engine sglang",
         "fieldPath": ".settings.speculative_algorithm"},
        {"rule": f"{native} || (has(self.gpusPerReplica) && self.gpusPerReplica > 0)",
         "message": "engine sglang runs on GPUs: gpusPerReplica must be >= 1", "fieldPath": ".gpusPerReplica"},
        {"rule": f"{native} || !self.model.startsWith('{embedded}')",
         "message": f"engine sglang serves a model directory; {DEFAULT_MODEL} runs on engine native",
         "fieldPath": ".model"},
    ]


def settings_schema() -> dict[str, Any]:
    service = structural(ServiceSettings.model_json_schema())
    return {
        "type": "object",
        "description": "service settings by their own names (`kvbuffer serve --help`); unset ones keep the "
                       "service's defaults",
        "properties": {name: service["properties"][name] for name in CR_SETTINGS},
    }


def autoscaling_rules() -> list[dict[str, str]]:
    """minReplicas <= maxReplicas also when only one of them is set (the other then has its default)."""
    low, high = (_value(AutoscalingSpec, name, AutoscalingSpec.model_fields[name].alias)
                 for name in ("min_replicas", "max_replicas"))
    return [{"rule": f"{low} <= {high}", "message": "minReplicas must be <= maxReplicas (default "
             f"{AutoscalingSpec.model_fields['max_replicas'].default})", "fieldPath": ".minReplicas"}]


def spec_schema() -> dict[str, Any]:
    schema = structural(KVBufferServiceSpec.model_json_schema(by_alias=True))
    schema.pop("description", None)
    properties = schema["properties"]
    properties["settings"] = settings_schema()
    properties["replicas"]["default"] = KVBufferServiceSpec.model_fields["replicas"].default  # the scale subresource
    autoscaling = properties["autoscaling"]
    autoscaling["x-kubernetes-validations"] = [*autoscaling.get("x-kubernetes-validations", []),
                                               *autoscaling_rules()]
    properties["model"]["x-kubernetes-validations"] = [
        {"rule": "self == oldSelf", "message": "model is immutable: create another KVBufferService"}]
    schema["x-kubernetes-validations"] = [
        {"rule": "(has(self.gpusPerReplica) ? self.gpusPerReplica : 0) % "
                 "(has(self.tensorParallelSize) ? self.tensorParallelSize : 1) == 0",
         "message": "gpusPerReplica must be a multiple of tensorParallelSize", "fieldPath": ".gpusPerReplica"},
        {"rule": "(has(self.tensorParallelSize) ? self.tensorParallelSize : 1) == 1 || "
                 "(has(self.engine) && self.engine == 'sglang')",
         "message": "tensorParallelSize > 1 needs engine sglang (the native engine runs one GPU)",
         "fieldPath": ".tensorParallelSize"},
        *settings_rules()]
    return schema


def status_schema() -> dict[str, Any]:
    schema = structural(KVBufferServiceStatus.model_json_schema(by_alias=True), describe_defaults=False)
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
    {"name": "Decode", "type": "string", "jsonPath": ".spec.settings.decode_mode",
     "description": "decode_mode (unset: the service default)"},
    {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Buffered", "type": "string", "jsonPath": ".status.telemetry.bufferedShare",
     "description": "share of decoded tokens that wrote no state (stateless + buffered paths)"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{r.PLURAL}.{r.GROUP}", "labels": {"app.kubernetes.io/name": "kvbuffer"}},
        "spec": {
            "group": r.GROUP,
            "scope": "Namespaced",
            "names": {"kind": r.KIND, "plural": r.PLURAL, "singular": r.SINGULAR, "shortNames": list(r.SHORT_NAMES),
                      "listKind": f"{r.KIND}List"},
            "versions": [{
                "name": r.VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A fleet of kvbuffer servers of one model: settings, size and autoscaling.",
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": status_schema(),
                    },
                    "required": ["spec"],
                }},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": PRINTER_COLUMNS,
            }],
        },
    }


def render() -> str:
    header = f"# Generated by `python -m kvbuffer.operator.crd > {FILE}`; do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render())
