"""The Dockerfile, linted by hadolint (no container engine runs here; the build command is in the chart README),
and the promises the chart relies on: the user the pods run as, the ports, the entrypoint, both targets."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from helm_harness import REPO, tool

DOCKERFILE = REPO / "Dockerfile"


def test_hadolint_is_clean() -> None:
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_defect(tmp_path: Path) -> None:
    """The lint above can fail: an unpinned base image and a pip install keeping its cache are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install kvbuffer\n")
    result = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3042" in result.stdout


def _stage(name: str) -> str:
    text = DOCKERFILE.read_text()
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no stage {name}"
    return match.group(1)


def test_final_stages_run_kvbuffer_as_the_charts_user() -> None:
    for target in ("cpu", "gpu"):
        stage = _stage(target)
        assert "USER 10001:10001" in stage, target  # the chart's runAsUser
        assert "EXPOSE 50051 9464" in stage, target
        assert 'ENTRYPOINT ["kvbuffer"]' in stage, target
        for label in ("source", "version", "licenses"):
            assert f"org.opencontainers.image.{label}=" in stage, (target, label)
    assert DOCKERFILE.read_text().rstrip().splitlines()[-1] == 'CMD ["serve"]'
    assert re.search(r"^FROM \$\{SGLANG_IMAGE\} AS gpu$", DOCKERFILE.read_text(), re.MULTILINE)
