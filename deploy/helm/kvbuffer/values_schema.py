"""values.schema.json from the comments of values.yaml: `python deploy/helm/kvbuffer/values_schema.py [--check]`.

Each field's description is the comment block above it; a `# @schema {...}` line in that block (a YAML flow
mapping) adds JSON Schema keywords. The type comes from the default value unless given; an object's fields are
the ones values.yaml lists, and no others (a misspelt key fails `helm install`). `$ref: crd:PATH` takes the
KVBufferService CRD's schema at PATH (`spec`, `spec.settings`, ...), converted from Kubernetes' OpenAPI v3 to JSON
Schema, so the service settings are checked by the schema the operator's API uses, never a copy of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
CRD = CHART / "crds" / "kvbufferservices.serving.kvbuffer.io.yaml"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_-]*):(?: |$)")
_SCHEMA_LINE = re.compile(r"^\s*# @schema (?P<keywords>\{.*\})\s*$")
_COMMENT = re.compile(r"^\s*#(?: (?P<text>.*))?$")


def json_schema(openapi: dict[str, Any], closed: bool = True) -> dict[str, Any]:
    """A Kubernetes structural OpenAPI v3 schema as JSON Schema (draft 7): boolean exclusive bounds become numbers,
    `nullable` a null type, int-or-string an anyOf; x-kubernetes-* rules (CEL) have no JSON Schema form and are
    dropped. closed: objects with listed properties refuse others (the API server's strict field validation)."""
    out: dict[str, Any] = {}
    for key, value in openapi.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "exclusiveMinimum", "exclusiveMaximum"):
            continue
        if key == "properties":
            out[key] = {name: json_schema(sub, closed) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = json_schema(value, closed)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [json_schema(sub, closed) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if openapi.get(bound) is True:
            out[bound] = out.pop(limit)
    if openapi.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if openapi.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (closed and "properties" in out and "additionalProperties" not in out
            and not openapi.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_schema(crd: dict[str, Any], path: str) -> dict[str, Any]:
    """The CRD's served schema at a dotted path below the object (`spec.settings`), as JSON Schema."""
    node = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for name in path.split("."):
        node = node["properties"][name]
    return json_schema(node)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        below = merged.get(key)
        merged[key] = _merge(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return merged


def _resolve(keywords: dict[str, Any], crd: dict[str, Any]) -> dict[str, Any]:
    """keywords with each `$ref: crd:PATH` replaced by that schema, the keywords beside it merged over it."""
    resolved = {key: _resolve(value, crd) if isinstance(value, dict) else value for key, value in keywords.items()}
    reference = resolved.pop("$ref", None)
    if reference is None:
        return resolved
    if not reference.startswith("crd:"):
        raise ValueError(f"$ref {reference!r}: only crd:PATH is known")
    return _merge(crd_schema(crd, reference.removeprefix("crd:")), resolved)


Fields = dict[tuple[str, ...], tuple[str, str, dict[str, Any]]]
# Keywords that give a field's whole schema: its value is data (a map of labels, a list), not fields of its own.
_WHOLE = frozenset({"$ref", "type", "additionalProperties", "items"})


def field_comments(text: str) -> Fields:
    """(line, description, @schema keywords) of each key of values.yaml, by its path of keys."""
    fields: Fields = {}
    parents: list[tuple[int, str]] = []
    block: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        key = _KEY.match(line)
        comment = _COMMENT.match(line)
        if comment:
            block.append(line)
            continue
        if not key:
            block = []
            continue
        indent = len(key["indent"])
        parents = [(depth, name) for depth, name in parents if depth < indent]
        path = (*(name for _depth, name in parents), key["key"])
        parents.append((indent, key["key"]))
        keywords: dict[str, Any] = {}
        description = []
        for commented in block:
            if schema := _SCHEMA_LINE.match(commented):
                keywords = yaml.safe_load(schema["keywords"])
            else:
                description.append((_COMMENT.match(commented)["text"] or "").strip())  # type: ignore[index]
        fields[path] = (f"values.yaml:{number}", " ".join(description), keywords)
        block = []
    return fields


def _type_of(value: Any) -> str | None:
    for python, schema_type in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                                (dict, "object"), (list, "array")):
        if isinstance(value, python):
            return schema_type
    return None


def field_schema(path: tuple[str, ...], value: Any, fields: Fields, crd: dict[str, Any]) -> dict[str, Any]:
    """The schema of one field; a map without whole-schema keywords is a group of documented fields."""
    line, description, keywords = fields[path]
    if not description:
        raise ValueError(f"{line}: {'.'.join(path)} has no description comment")
    schema = _resolve(keywords, crd)
    if isinstance(value, dict) and value and not _WHOLE.intersection(keywords):
        schema["type"] = "object"
        schema["properties"] = {name: field_schema((*path, name), sub, fields, crd) for name, sub in value.items()}
        schema.setdefault("additionalProperties", False)
    elif "type" not in schema and "anyOf" not in schema and (value_type := _type_of(value)):
        schema["type"] = value_type
    schema["description"] = description
    return schema


def values_schema(values_text: str, crd: dict[str, Any]) -> dict[str, Any]:
    values = yaml.safe_load(values_text)
    fields = field_comments(values_text)
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Values of the kvbuffer chart (generated from values.yaml by values_schema.py; do not edit)",
        "type": "object",
        "properties": {name: field_schema((name,), value, fields, crd) for name, value in values.items()},
        "additionalProperties": False,
    }


def render() -> str:
    crd = yaml.safe_load(CRD.read_text())
    return json.dumps(values_schema(VALUES.read_text(), crd), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if values.schema.json is not up to date")
    args = parser.parse_args()
    schema = render()
    if args.check:
        if SCHEMA.read_text() != schema:
            print(f"{SCHEMA} is stale: run python {Path(__file__).relative_to(Path.cwd())}", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(schema)
    return 0


if __name__ == "__main__":
    sys.exit(main())
