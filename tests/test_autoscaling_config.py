"""AutoscalingSpec: both spellings accepted, camelCase out, every bad value refused naming the field, and the
schema the CRD is generated from documents every field and carries the cross-field rule."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from kvbuffer.operator.autoscaling.config import AutoscalingSpec
from pydantic import ValidationError


def test_camel_case_and_python_names_are_the_same_setting() -> None:
    rng = random.Random()
    low = rng.randint(1, 50)
    high = low + rng.randint(0, 50)
    utilization = round(rng.uniform(0.1, 1.0), 3)
    camel = AutoscalingSpec.model_validate({"enabled": True, "minReplicas": low, "maxReplicas": high,
                                            "targetUtilization": utilization,
                                            "pathTokensPerSecond": {"recurrent": 123.0}})
    python = AutoscalingSpec(enabled=True, min_replicas=low, max_replicas=high, target_utilization=utilization,
                             path_tokens_per_second={"recurrent": 123.0})
    assert camel == python
    dumped = camel.model_dump(by_alias=True)
    assert (dumped["minReplicas"], dumped["maxReplicas"], dumped["targetUtilization"]) == (low, high, utilization)
    assert dumped["pathTokensPerSecond"]["recurrent"] == 123.0
    assert AutoscalingSpec.model_validate(dumped) == camel


@pytest.mark.parametrize(("values", "field", "message"), [
    ({"minReplicas": 0}, "minReplicas", "greater than or equal to 1"),
    ({"maxReplicas": 1001}, "maxReplicas", "less than or equal to 1000"),
    ({"targetUtilization": 0.05}, "targetUtilization", "greater than or equal to 0.1"),
    ({"tolerance": 0.7}, "tolerance", "less than or equal to 0.5"),
    ({"panicThreshold": 1.0}, "panicThreshold", "greater than or equal to 1.1"),
    ({"ttftTargetSeconds": 0}, "ttftTargetSeconds", "greater than 0"),
    ({"pathTokensPerSecond": {"buffered": -1}}, "pathTokensPerSecond.buffered", "greater than 0"),
    ({"scaleUpEverything": True}, "scaleUpEverything", "Extra inputs are not permitted"),
])
def test_bad_values_are_refused_naming_the_field(values: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as error:
        AutoscalingSpec.model_validate(values)
    (detail,) = error.value.errors()
    assert ".".join(str(part) for part in detail["loc"]) == field
    assert message in detail["msg"]


def test_cross_field_rules_name_both_fields() -> None:
    with pytest.raises(ValidationError, match=r"minReplicas \(5\) must be <= maxReplicas \(4\)"):
        AutoscalingSpec.model_validate({"minReplicas": 5})
    with pytest.raises(ValidationError, match=r"panicWindowSeconds \(90.0\) must be <= stableWindowSeconds"):
        AutoscalingSpec.model_validate({"panicWindowSeconds": 90})


def test_the_generated_schema_documents_every_field_with_its_range() -> None:
    schema = AutoscalingSpec.model_json_schema(by_alias=True)
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name
    assert set(schema["properties"]) == {field.alias for field in AutoscalingSpec.model_fields.values()}
    numeric = [p for p in schema["properties"].values() if p.get("type") in ("integer", "number")]
    assert all(("minimum" in p or "exclusiveMinimum" in p) and "maximum" in p for p in numeric)
    (rule,) = schema["x-kubernetes-validations"]
    assert rule["rule"] == ("(has(self.panicWindowSeconds) ? self.panicWindowSeconds : 10.0) <= "
                            "(has(self.stableWindowSeconds) ? self.stableWindowSeconds : 60.0)")
    assert schema["additionalProperties"] is False


def test_docs_list_every_knob_with_its_default() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "AUTOSCALING.md").read_text()
    knobs = text.split("## The knobs", 1)[1].split("\n## ", 1)[0]
    for name, field in AutoscalingSpec.model_fields.items():
        match = re.search(rf"`{field.alias}` \(([^)]*)\)", knobs)
        assert match, f"{field.alias} is not listed in docs/AUTOSCALING.md, 'The knobs'"
        if name == "enabled":
            assert match.group(1) == "false"
        elif isinstance(field.default, int | float):
            assert float(match.group(1)) == field.default, field.alias
