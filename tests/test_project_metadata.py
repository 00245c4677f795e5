"""What pyproject.toml claims about the interpreter holds where the tests run: the oldest Python it admits is
one the suite runs on, and the linter checks the code for that Python."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_the_oldest_python_admitted_is_the_one_tested() -> None:
    """CI runs Python 3.11: an older Python (3.10's asyncio.TimeoutError is not the built-in TimeoutError) would be
    claimed without ever being run."""
    admitted = SpecifierSet(PYPROJECT["project"]["requires-python"])
    oldest = next(f"3.{minor}" for minor in range(0, 40) if f"3.{minor}" in admitted)
    assert oldest == "3.11" and f"{sys.version_info.major}.{sys.version_info.minor}" in admitted
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"
