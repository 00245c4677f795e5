"""pydantic's JSON Schema -> the structural OpenAPI v3 schema a CRD needs.

Kubernetes takes a subset of OpenAPI v3.0 (https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/
custom-resource-definitions/#specifying-a-structural-schema): no `$ref`, no `additionalProperties: false`, no
`const`, `nullable` instead of a null alternative, boolean `exclusiveMinimum`, int-or-string as an extension. Defaults
go into the description instead of the schema: the API server would otherwise store today's defaults in every
object, and a later image could not change them.
"""

from __future__ import annotations

from typing import Any

_FORMATS = frozenset({"int32", "int64", "float", "double", "byte", "date", "date-time"})
_DROPPED = frozenset({"title", "default", "writeOnly", "readOnly", "$defs", "examples"})


def structural(schema: dict[str, Any], describe_defaults: bool = True) -> dict[str, Any]:
    """The schema with every `$ref` inlined and every keyword Kubernetes refuses translated or dropped."""
    return _convert(schema, schema.get("$defs", {}), describe_defaults)


def _convert(node: dict[str, Any], defs: dict[str, Any], describe_defaults: bool = True) -> dict[str, Any]:
    if "$ref" in node:
        target = _convert(defs[node["$ref"].rsplit("/", 1)[-1]], defs, describe_defaults)
        extra = {key: value for key, value in node.items() if key != "$ref"}
        return {**target, **_convert(extra, defs, describe_defaults)} if extra else target
    alternatives = node.get("anyOf")
    if alternatives is not None:
        return _any_of(node, alternatives, defs, describe_defaults)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED or (key == "format" and value not in _FORMATS):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: _convert(sub, defs, describe_defaults) for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs, describe_defaults)
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out[key] = _convert(value, defs, describe_defaults)
        else:
            out[key] = value
    if describe_defaults and node.get("default") not in (None, "", {}, []):
        out["description"] = f"{out.get('description', '').rstrip('.')}; default {_show(node['default'])}".lstrip("; ")
    return out


def _any_of(node: dict[str, Any], alternatives: list[dict[str, Any]], defs: dict[str, Any],
            describe_defaults: bool) -> dict[str, Any]:
    """`X | None` -> X, nullable; `int | str` -> int-or-string; anything else has no structural form."""
    rest = {key: value for key, value in node.items() if key != "anyOf"}
    kinds = [alt for alt in alternatives if alt.get("type") != "null"]
    types = sorted(alt.get("type", "") for alt in kinds)
    if len(kinds) == 1:
        merged = {**_convert(kinds[0], defs, describe_defaults), **_convert(rest, defs, describe_defaults)}
        if len(kinds) < len(alternatives):
            merged["nullable"] = True
        return merged
    if types == ["integer", "string"]:
        return {**_convert(rest, defs, describe_defaults), "x-kubernetes-int-or-string": True}
    raise ValueError(f"no structural schema for anyOf {alternatives}")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_show(sub)}" for key, sub in value.items()) + "}"
    return str(value)
