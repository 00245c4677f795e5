"""Test setup: without a GPU, Triton kernels run under the interpreter and `gpu` tests are skipped."""

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def sglang_plugin() -> Iterator[None]:
    """The KVBuffer plugin loaded into SGLang as SGLang loads it (sglang_cpu.load_plugin), for a test module; its
    patches end with the module (SGLang keeps the hooks: it loads plugins once per process)."""
    import sglang_cpu

    with pytest.MonkeyPatch.context() as patch:
        sglang_cpu.load_plugin(patch)
        yield
