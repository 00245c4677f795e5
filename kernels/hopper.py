"""Builds the KVBuffer kernels for a Hopper GPU (sm_90) on any machine, with the ptxas Triton ships.

Two uses where no GPU is at hand: CI catches the compile errors the Triton interpreter cannot see, and
`python -m kvbuffer.kernels.hopper` prints each kernel's registers, spills and shared memory at Qwen3-Next
shapes under every GPU's launch table (registers bound the occupancy of these memory-bound kernels).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import step
from .fold import _fold_kernel, fold_triton
from .launches import ANY_BATCH, DEFAULT, LAUNCHES, Launch


@dataclass(frozen=True)
class Build:
    """One kernel configuration: runtime argument types (Triton spelling, e.g. `*bf16`, `i32`) and constexprs."""

    name: str
    kernel: triton.runtime.JITFunction
    types: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    # the kernels that stream checkpoints must not spill (occupancy is their speed); the scores kernels do little
    # work per request, and at one warp spill a few hundred bytes under some Triton versions (3.9, not 3.6) while
    # running faster on the H100 than their spill-free multi-warp forms (docs/BENCHMARKS.md)
    may_spill: bool = False


@dataclass(frozen=True)
class Resources:
    registers: int
    spill_bytes: int
    shared_bytes: int


def compile_for_hopper(build: Build) -> triton.compiler.CompiledKernel:
    """The kernel built for sm_90; raises triton's CompilationError where a GPU build would fail."""
    names = list(inspect.signature(build.kernel.fn).parameters)
    signature = {n: "constexpr" if n in build.constexprs else build.types[n] for n in names}
    constexprs = {(names.index(n),): v for n, v in build.constexprs.items()}
    # as a launch specializes them: pointers 16-byte aligned (PyTorch allocations are), so loads vectorize
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n].startswith("*")}
    src = ASTSource(fn=build.kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": build.num_warps})


def resources(kernel: triton.compiler.CompiledKernel) -> Resources:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    field = {key: int(m.group(1)) if (m := re.search(rf"{key}:(\d+)", report)) else 0
             for key in ("REG", "STACK", "LOCAL", "SHARED")}
    # ptxas puts spilled registers in the stack frame (STACK); LOCAL stays 0 for them. Shared memory: the
    # static part, or the dynamic part Triton sizes for pipelined loads, whichever is larger
    return Resources(field["REG"], field["STACK"] + field["LOCAL"], max(field["SHARED"], kernel.metadata.shared))


def step_builds(launch: Launch = DEFAULT, H: int = 16, HV: int = 32, K: int = 128, V: int = 128,
                capacity: int = 40, tokens: int = 4, key_type: str = "bf16") -> list[Build]:
    """The configurations the KVBuffer kernels launch under `launch`, at the given shapes (every decode entry
    of its batch-size table once)."""
    decode_tuning = inspect.signature(step._decode).parameters
    fold_tuning = inspect.signature(fold_triton).parameters
    block_l = decode_tuning["block_l"].default
    BK, BT = step.block(K), step.block(min(tokens, step.MAX_TOKENS_PER_ROUND))
    fold_BV = min(step.block(V), fold_tuning["block_v"].default)
    inputs = dict.fromkeys(("q", "k", "v", "a", "b", "out", "buf_keys"), "*" + key_type)
    floats = dict.fromkeys(("A_log", "dt_bias", "states", "buf_values", "weights", "solve", "coefs"), "*fp32")
    ints = dict.fromkeys(("cu_seqlens", "buf_slots", "buf_lens", "read_slots", "write_slots"), "*i32")
    types = {**inputs, **floats, **ints, "buf_decay": "*fp64", "offset": "i32", "scale": "fp32"}
    shape = dict(H=H, HV=HV, K=K, BK=BK)
    decode = dict(shape, V=V, L=capacity, BL=block_l, FLUSH_STAGES=launch.flush_stages)
    fold_shape = dict(H=H, HV=HV, K=K, V=V, L=capacity, BK=BK, BV=fold_BV, STAGES=launch.flush_stages)
    fold_types = {"states": "*fp32", "buf_keys": "*" + key_type, "buf_values": "*fp32", "weights": "*fp32",
                  "decays": "*fp32", **ints}
    pdl = launch.verify_programmatic  # what a Hopper GPU launches
    rows, warps = launch.recurrent
    builds = [Build("decode apply (recurrent)", step._decode_apply_kernel, types,
                    dict(decode, L=1, BV=min(step.block(V), rows), HAS_BUFFER=False, INLINE_SCORES=False, PDL=False),
                    warps)]
    for scores_pdl in sorted({d.programmatic for d in launch.decode if not d.inline}):
        builds.append(Build("decode scores" + (" (overlapped)" if scores_pdl else ""), step._decode_scores_kernel,
                            types, dict(shape, L=capacity, BL=block_l, HEADS=launch.decode_scores_heads,
                                        PDL=scores_pdl), launch.decode_scores_warps, may_spill=True))
    for d in launch.decode:
        kind = "one launch" if d.inline else "overlapped" if d.programmatic else "two launches"
        builds.append(Build(f"decode apply (B<={d.max_requests}, {kind}, v{d.rows}w{d.warps})".replace(
            f"B<={ANY_BATCH}", "any B"), step._decode_apply_kernel, types,
            dict(decode, BV=min(step.block(V), d.rows), HAS_BUFFER=True, INLINE_SCORES=d.inline,
                 PDL=d.programmatic and not d.inline), d.warps,
            # a 32-row tile per warp sits at the register ceiling: 250 registers and no spill under the GPU's
            # Triton 3.6, where the H200 sweep measured it fastest; a few bytes spill under newer Triton
            may_spill=d.rows // d.warps >= 32))
    rows, warps = launch.verify
    builds += [
        Build(f"verify scores (T={tokens})", step._scores_kernel, types,
              dict(shape, L=capacity, BL=block_l, BT=BT, BG=triton.next_power_of_2(HV // H),
                   KC=min(BK, step.SCORES_K_CHUNK), PRECISION="tf32", PDL=pdl), launch.verify_scores_warps,
              may_spill=True),
        Build(f"verify apply (T={tokens}, v{rows}w{warps})", step._block_apply_kernel, types,
              dict(shape, V=V, L=capacity, BV=min(step.block(V), rows), BL=block_l, BT=BT,
                   EXACT_INPUTS=key_type != "fp32", KC=min(BK, launch.verify_k_chunk), STAGES=launch.verify_stages,
                   PDL=pdl), warps),
        Build("fold", _fold_kernel, fold_types, fold_shape, fold_tuning["num_warps"].default),
    ]
    return builds


def main() -> int:
    """Prints each GPU's table; exits 1 if a kernel that must not spill does (the build itself raises on a
    compile error)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be built")
    failed = False
    for gpu, launch in LAUNCHES.items():
        print(f"{gpu}:\n{'kernel':50} {'registers':>9} {'spilled B':>9} {'shared B':>9}")
        for build in step_builds(launch):
            r = resources(compile_for_hopper(build))
            failed |= r.spill_bytes > 0 and not build.may_spill
            note = " (allowed)" if r.spill_bytes and build.may_spill else ""
            print(f"{build.name:50} {r.registers:9} {r.spill_bytes:9} {r.shared_bytes:9}{note}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
