"""Test setup: without a GPU, Triton kernels run under the interpreter and `gpu` tests are skipped; a CUDA build of
torchvision beside the CPU torch is made importable."""

import importlib.util
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _import_torchvision() -> None:
    """PyPI's torchvision is a CUDA build (CI installs it for sglang's imports): beside the CPU torch its operator
    library does not load, and `import torchvision` (which transformers' models and sglang do where it is installed)
    then fails registering fake kernels for the two operators `torchvision::nms` / `qnms` it lacks. Declaring their
    schemas (those the library would have registered) lets it import; no torchvision operator runs in the tests."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision
    except RuntimeError:
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        for name in ("nms", "qnms"):
            torch.library.define(f"torchvision::{name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401


_import_torchvision()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
