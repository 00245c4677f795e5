"""SGLang's real ServerArgs on a CPU test machine (sglang installed with --no-deps, see .ci/run).

Two things stop `import sglang` there, neither of them SGLang's code under test: PyPI's torchvision, a CUDA build
(tests/conftest.py makes it importable), and:
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


@functools.cache
def sglang_import_error() -> str | None:
    """None if sglang imports here, else why not (a skip reason)."""
    try:
        import transformers

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
