"""Every kernel configuration the ops launch builds for a Hopper GPU (sm_90), those that stream checkpoints with
no register spills (hopper.Build.may_spill says which may).

The interpreter runs kernel logic on CPU but cannot see GPU-only compile errors; `kvbuffer.kernels.hopper`
builds the real cubins with the ptxas Triton ships, in a process without TRITON_INTERPRET, so such errors
fail CI on a machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from kvbuffer.kernels.launches import LAUNCHES

if importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("Triton's NVIDIA backend is not installed", allow_module_level=True)


def test_kernels_build_for_hopper_and_the_checkpoint_passes_do_not_spill() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "kvbuffer.kernels.hopper"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr[-3000:]}"
    for gpu in LAUNCHES:
        assert f"{gpu}:" in run.stdout, run.stdout
    assert "two launches" in run.stdout and "verify apply" in run.stdout
