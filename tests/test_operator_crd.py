"""The CRD: generated files are current, the schema (jsonschema) and every CEL rule (cel-python) accept the
example CRs and refuse bad edits, and the CEL rules agree with the operator's own check (ServiceSettings) on
random settings, so a spec the API server admits is one the operator applies."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kvbuffer.operator import crd, peering, rbac
from kvbuffer.operator.spec import CR_SETTINGS, SpecError, parse_spec
from operator_emulator import crd_to_jsonschema
from test_operator_render import KUBERNETES_VERSION

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
SCHEMA = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
_CEL = celpy.Environment()


@pytest.mark.parametrize("module", [crd, peering, rbac], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_committed_file_is_current(module: Any) -> None:
    regenerate = f"stale: python -m {module.__name__} > {module.FILE}"
    assert (ROOT / module.FILE).read_text() == module.render(), regenerate


def test_crds_are_valid_kubernetes_objects() -> None:
    for definition in (crd.crd(), *peering.CRDS):
        kubernetes_validate.validate(definition, KUBERNETES_VERSION, strict=True)


def schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from schema_nodes(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from schema_nodes(node[key], f"{path}[{key}]")


def test_schema_is_structural() -> None:
    """What the API server requires of a CRD schema (kubernetes-validate does not look inside it)."""
    for path, node in schema_nodes(SCHEMA):
        refused = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title"}
        defaults = {"default"} if path != ".spec.replicas" else set()  # the only default: the scale subresource's
        assert not (refused | defaults) & set(node), path
        assert node.get("additionalProperties") is not False, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "exclusiveMinimum" in node or "exclusiveMaximum" in node:
            assert isinstance(node.get("exclusiveMinimum", True), bool), path


def rules(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, str]]]:
    """Every x-kubernetes-validations rule with the path of the object it applies to."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule
    for name, sub in schema.get("properties", {}).items():
        yield from rules(sub, (*path, name))


def at(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def cel_violations(new: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """The messages of the rules `new` breaks, evaluated as the API server does: a rule on an absent field is
    not run, a transition rule (oldSelf) only on update."""
    broken = []
    for path, rule in rules(SCHEMA):
        value = at(new, path)
        old_value = at(old, path) if old is not None else None
        transition = "oldSelf" in rule["rule"]
        if value is None or (transition and old_value is None):
            continue
        activation = {"self": celpy.json_to_cel(value)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(old_value)
        if not bool(_CEL.program(_CEL.compile(rule["rule"])).evaluate(activation)):
            broken.append(rule["message"])
    return broken


def schema_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(crd_to_jsonschema(SCHEMA))
    return [error.message for error in validator.iter_errors(obj)]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_admitted_and_applied(path: Path) -> None:
    example = yaml.safe_load(path.read_text())
    assert schema_errors(example) == []
    assert cel_violations(example) == []
    assert cel_violations(example, old=example) == []
    parse_spec(example["spec"])


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 2


BAD_EDITS = [
    ({"settings": {"buffer_size": 32, "chunk_size": 32, "speculative_algorithm": "ngram",
                   "speculative_num_draft_tokens": 4}}, "cel", "chunk_size + speculative_num_draft_tokens"),
    ({"settings": {"chunk_size": 80}}, "cel", "chunk_size + speculative_num_draft_tokens"),  # default buffer 64
    ({"settings": {"decode_mode": "recurrent", "speculative_algorithm": "ngram", "chunk_size": 16}}, "cel",
     "speculative decoding needs decode_mode kvbuffer"),
    ({"gpusPerReplica": 3, "tensorParallelSize": 2}, "cel", "multiple of tensorParallelSize"),
    ({"engine": "native", "gpusPerReplica": 2, "tensorParallelSize": 2}, "cel", "needs engine sglang"),
    ({"autoscaling": {"minReplicas": 6, "maxReplicas": 3}}, "cel", "minReplicas must be <= maxReplicas"),
    ({"autoscaling": {"minReplicas": 6}}, "cel", "minReplicas must be <= maxReplicas"),  # default maxReplicas 4
    ({"model": "another-model"}, "cel", "model is immutable"),
    ({"settings": {"buffer_size": 0}}, "schema", "0 is less than the minimum of 1"),
    ({"settings": {"decode_mode": "fast"}}, "schema", "'fast' is not one of"),
    ({"settings": {"port": 8000}}, "schema", "Additional properties"),
    ({"replicas": -1}, "schema", "-1 is less than the minimum of 0"),
    ({"engine": "vllm"}, "schema", "'vllm' is not one of"),
    ({"autoscaling": {"targetUtilization": 0}}, "schema", "0 is less than the minimum of 0.1"),
]


@pytest.mark.parametrize(("edit", "where", "message"), BAD_EDITS, ids=[m for _, _, m in BAD_EDITS])
def test_bad_edit_is_refused(edit: dict[str, Any], where: str, message: str) -> None:
    old = yaml.safe_load(EXAMPLES[0].read_text())
    new = {**old, "spec": {**old["spec"], **edit}}
    found = cel_violations(new, old) if where == "cel" else schema_errors(new)
    assert any(message in text for text in found), found
    if "model" not in edit:  # immutability is the API server's alone: the operator sees no old spec
        with pytest.raises(SpecError):  # the operator refuses it too, should the API server let it through
            parse_spec(new["spec"])


def test_cel_rules_agree_with_the_operator_on_random_settings() -> None:
    rng = random.Random()
    checked = {True: 0, False: 0}
    for _ in range(300):
        settings = {name: value for name, value in {
            "buffer_size": rng.randint(1, 96), "chunk_size": rng.randint(1, 96),
            "speculative_num_draft_tokens": rng.randint(0, 16),
            "speculative_algorithm": rng.choice(["none", "ngram"]),
            "decode_mode": rng.choice(["kvbuffer", "recurrent"])}.items() if rng.random() < 0.7}
        cr = {"spec": {"model": "m", "settings": settings}}
        admitted = not cel_violations(cr)
        try:
            parse_spec(cr["spec"])
            applied = True
        except SpecError:
            applied = False
        assert admitted == applied, settings
        checked[admitted] += 1
    assert min(checked.values()) > 20  # both verdicts were exercised


def random_gpu_spec(rng: random.Random) -> dict[str, Any]:
    """A spec of either engine as a platform team writes one: GPUs, tensor parallel, decode mode, speculation."""
    tp = rng.choice([1, 2, 4])
    spec = {"model": rng.choice(["/models/qwen3-next-80b", "embedded:tiny-qwen3-next"]),
            "engine": rng.choice(["native", "sglang"]), "gpusPerReplica": tp * rng.randint(0, 2),
            "tensorParallelSize": tp, "settings": {name: value for name, value in {
                "buffer_size": rng.randint(1, 160), "chunk_size": rng.randint(1, 128),
                "speculative_num_draft_tokens": rng.randint(0, 16),
                "speculative_algorithm": rng.choice(["none", "ngram", "nextn"]),
                "decode_mode": rng.choice(["kvbuffer", "recurrent"])}.items() if rng.random() < 0.7}}
    return {key: value for key, value in spec.items() if key == "model" or rng.random() < 0.8}


def test_cel_rules_agree_with_the_operator_on_either_engine() -> None:
    """The API server admits exactly the specs the operator applies, engine sglang (GPUs, tensor parallel, its own
    speculative verify and the recurrent baseline's speculation) included, not only the native engine's."""
    rng = random.Random()
    checked = {True: 0, False: 0}
    for _ in range(600):
        spec = random_gpu_spec(rng)
        admitted = not cel_violations({"spec": spec})
        try:
            parse_spec(spec)
            applied = True
        except SpecError as exc:
            applied, reason = False, str(exc)
        assert admitted == applied, (spec, cel_violations({"spec": spec}) or reason)
        checked[admitted] += 1
    assert min(checked.values()) > 50  # both verdicts were exercised


def test_settings_schema_is_the_service_settings() -> None:
    properties = SCHEMA["properties"]["spec"]["properties"]["settings"]["properties"]
    assert list(properties) == list(CR_SETTINGS)
    assert {"buffer_size", "chunk_size", "speculative_algorithm", "speculative_num_draft_tokens", "decode_mode",
            "max_running_requests"} <= set(properties)
    assert not {"host", "port", "metrics_port", "tls", "auth", "model"} & set(properties)


def test_scale_subresource_and_printer_columns() -> None:
    version = crd.crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".spec") or column["jsonPath"].startswith(".status"):
            path = tuple(column["jsonPath"].lstrip(".").split("."))
            node = SCHEMA
            for key in path:
                node = node["properties"][key]  # every column points at a field of the schema
            assert node["type"] == column["type"]
