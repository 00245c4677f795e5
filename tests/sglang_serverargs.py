"""SGLang's real ServerArgs on a CPU test machine (sglang installed with --no-deps, see .ci/run).

Two things stop `import sglang` there, neither of them SGLang's code under test:
- PyPI's torchvision is a CUDA build: beside the CPU torch its operator library does not load, and its
  `_meta_registrations` then fails on the missing `torchvision::nms` / `qnms` schemas. Declaring the two schemas
  (what the library would have registered) lets torchvision import; no torchvision operator is ever run here.
- sglang registers a `qwen3_asr` config that transformers newer than sglang's pin (5.12.1) already has; the
  registration is made tolerant (`exist_ok=True`) for the duration of the import.

`gpu_free_server_args()` also lets SGLang's ServerArgs resolve as on a GPU machine: its resolution asks the
platform whether CUDA is present and how much memory the GPU has, which a CPU cannot answer; the answers of an
H200 (CUDA, 141 GiB) stand in. Everything else (the argument checks and their resolution, the model config it
reads from the model directory) is SGLang's own.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import pytest

H200_MEMORY_MIB = 141 * 1024
_TORCHVISION_SCHEMAS = ("nms", "qnms")


def _import_torchvision() -> None:
    """torchvision as is where it imports; else with the two schemas declared, then imported afresh."""
    try:
        import torchvision
    except RuntimeError:
        import sys

        import torch

        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        for name in _TORCHVISION_SCHEMAS:
            torch.library.define(f"torchvision::{name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401


@functools.cache
def sglang_import_error() -> str | None:
    """None if sglang imports here, else why not (a skip reason)."""
    try:
        import transformers

        _import_torchvision()
        register = transformers.AutoConfig.register
        transformers.AutoConfig.register = functools.partial(register, exist_ok=True)
        try:
            import sglang.srt.server_args  # noqa: F401
            from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: F401
        finally:
            transformers.AutoConfig.register = register
    except Exception as exc:  # ImportError, or what a half-installed sglang raises while importing
        return f"sglang is not importable here ({type(exc).__name__}: {exc}); .ci/run installs it"
    return None


def require_sglang() -> None:
    """Skips the calling test (with the reason) where sglang cannot be imported."""
    reason = sglang_import_error()
    if reason is not None:
        pytest.skip(reason)


@contextlib.contextmanager
def gpu_free_server_args() -> Iterator[None]:
    """SGLang's ServerArgs resolves as on one H200 (see the module docstring)."""
    require_sglang()
    import sglang.srt.server_args as server_args

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_args, "is_cuda", lambda: True)
        patch.setattr(server_args, "get_device_memory_capacity", lambda device=None: H200_MEMORY_MIB)
        yield
