"""One Gated DeltaNet layer at Qwen3-Next shapes: decode and speculative verify, ours against the anchors.

Measured the way DESIGN.md section 4 measured its anchors: H=16 key heads, HV=32 value heads, K=V=128, fp32
state `[slots, HV, V, K]`, random data, a CUDA graph of `--steps` (16) consecutive steps with the per-step
bookkeeping each method needs, replayed `--replays` times per trial, the median of `--trials` trial means.
Every step reads fresh inputs. Buffered methods are staggered: request i starts with (n-1-i) % n buffered
tokens (n = chunk size or ring length), so request 0 flushes on the first step and flushes are spread over
the steps; `--replays` should be a multiple of n / `--steps` so the flush fraction is exact.

Decode, per batch size: SGLang's packed recurrent decode (`sgl recurrent`, the baseline), SGLang's ReplaySSM
decode (ring L), fla-core's fused recurrent kernel (gate and beta in kernel, state chained step to step: fla
has no slot indices, so its states are the request-ordered pool and each step writes a fresh one), our
`ops.recurrent_decode` and our `ops.buffered_decode` per chunk size (buffer capacity chunk + 8).
Verify, per batch size and draft length T: SGLang's recurrent target-verify (one state written per draft
token), the same plus SGLang's commit of the accepted state (a re-implementation of its one-pass
`fused_mamba_state_scatter_with_mask`, which is not among the unpacked files), and our `ops.verify` from a
checkpoint and a partly filled buffer followed by the commit `buf_lens + accepted`.

Correctness before timing, on the first step: each method's output (and the states it wrote) against SGLang's
recurrent kernel run from the same logical state; the SGLang rows against the fp64 PyTorch recurrence. A row
whose check fails says FAIL: its time means nothing. Bandwidth is the DESIGN.md section-3 byte model over the
measured time, against a device-to-device copy measured at start.

    python3 benchmarks/bench_kernels.py [--quick] [--json out.json]        # on the GPU machine
    python3 benchmarks/bench_kernels.py --dry-run                          # CPU: tiny shapes, Triton interpreter
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[1]
TOL_OUT = 2e-2    # relative error above which a row is marked FAIL (a broken kernel is off by O(1))
TOL_STATE = 1e-2


# ---------------------------------------------------------------------------------------------------------
# Shapes, plan, environment
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dims:
    H: int = 16
    HV: int = 32
    K: int = 128
    V: int = 128

    @property
    def state_bytes(self) -> int:
        return self.HV * self.V * self.K * 4

    @property
    def qkv_dim(self) -> int:
        return 2 * self.H * self.K + self.HV * self.V

    def entry_bytes(self, key_bytes: int, value_bytes: int) -> int:
        """A buffer/ring entry as DESIGN.md section 3 counts it: d `[HV, V]` plus k `[H, K]`."""
        return self.HV * self.V * value_bytes + self.H * self.K * key_bytes


TUNING_SPEC = re.compile(r"(?:(?P<launches>one|two|auto)-?)?(?P<knobs>(?:[a-z]\d+)*)(?:@(?P<batches>\d+(?:,\d+)*))?")
TUNING_KNOBS = {"v": "block_v", "w": "num_warps", "l": "block_l", "s": "scores_warps", "p": "programmatic",
                "h": "scores_heads", "f": "flush_stages", "k": "k_chunk", "n": "stages"}


@dataclass(frozen=True)
class Tuning:
    """Launch parameters of our rows, spelled as on the command line (`--tunings`, `--verify-tunings`): a launch
    kind, then knobs (a letter and a number each, any order); unset parts keep the GPU's table
    (kvbuffer.kernels.launches). Decode: `one`/`two` force the single
    launch (buffer weighed in the apply) or the scores launch first at every batch size (default: the table's
    choice by batch size), `v` value rows per apply program and `w` its warps (of the table's entries of that kind),
    `s` warps and `h` value heads per program of the scores launch, `p0`/`p1` the apply launch overlapping the
    scores launch off/on (programmatic dependent launch), `f` buffer entries a flush loads ahead. Verify: `v`/`w`
    the block apply's tile, `s` its scores launch's warps, `p0`/`p1` the overlap, `k` key columns per checkpoint
    chunk, `n` pipeline stages. Both: `l` buffer
    entries per product; `@B,B` runs the row only at these batch sizes. E.g. `v32w1`, `two-v16w1h2p1f16`,
    `v64w2n4`, `two-p1@1,8`."""

    spec: str = ""
    launches: str = "auto"
    block_v: int | None = None
    num_warps: int | None = None
    block_l: int | None = None
    scores_warps: int | None = None
    programmatic: int | None = None
    scores_heads: int | None = None
    flush_stages: int | None = None
    k_chunk: int | None = None
    stages: int | None = None
    batches: tuple[int, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Tuning:
        match = TUNING_SPEC.fullmatch(spec)
        knobs = re.findall(r"([a-z])(\d+)", match["knobs"]) if match else []
        if match is None or not spec or any(letter not in TUNING_KNOBS for letter, _ in knobs) or (
                len({letter for letter, _ in knobs}) < len(knobs)):
            raise argparse.ArgumentTypeError(f"bad tuning {spec!r}: write e.g. auto, two, v8w1, two-v16w1h2p1f16, "
                                             f"v64w2n4, p1@8 (knobs: {', '.join(TUNING_KNOBS)})")
        batches = tuple(int(b) for b in (match["batches"] or "").split(",") if b)
        return cls(spec="" if spec == "auto" else spec, launches=match["launches"] or "auto", batches=batches,
                   **{TUNING_KNOBS[letter]: int(value) for letter, value in knobs})

    def runs_at(self, batch: int) -> bool:
        return not self.batches or batch in self.batches

    def kernel_args(self) -> dict[str, int]:
        """What the ops' `tuning` argument takes (tiles and warps travel in the launch table, per launch kind)."""
        return {} if self.block_l is None else {"block_l": self.block_l}

    def _decode(self, base: Any) -> Any:
        from kvbuffer.kernels import launches
        inline = self.launches == "one"
        table = base.decode
        if self.launches != "auto":  # one entry of that kind for every batch (the H100's if the table has none)
            kind = [d for d in table if d.inline == inline] or [d for d in launches.H100.decode if d.inline == inline]
            table = (replace(kind[-1], max_requests=sys.maxsize),)
        tile = {"rows": self.block_v, "warps": self.num_warps,
                "programmatic": None if self.programmatic is None else bool(self.programmatic)}
        tile = {name: value for name, value in tile.items() if value is not None}
        table = tuple(replace(d, **tile) if d.inline == inline else d for d in table)
        changes = {"decode_scores_warps": self.scores_warps, "decode_scores_heads": self.scores_heads,
                   "flush_stages": self.flush_stages}
        return replace(base, decode=table, **{name: value for name, value in changes.items() if value is not None})

    def _verify(self, base: Any) -> Any:
        rows, warps = base.verify
        changes = {"verify": (self.block_v or rows, self.num_warps or warps),
                   "verify_scores_warps": self.scores_warps, "verify_k_chunk": self.k_chunk,
                   "verify_stages": self.stages,
                   "verify_programmatic": None if self.programmatic is None else bool(self.programmatic)}
        return replace(base, **{name: value for name, value in changes.items() if value is not None})

    @contextlib.contextmanager
    def applied(self, section: str, device: torch.device) -> Iterator[None]:
        """The kernels launch with the device's table changed by this tuning, for the duration of a call."""
        from kvbuffer.kernels import launches
        base = launches.launch_for(device)
        with launches.use_launch(self._decode(base) if section == "decode" else self._verify(base)):
            yield


@dataclass(frozen=True)
class Plan:
    batches: tuple[int, ...]
    chunks: tuple[int, ...]
    rings: tuple[int, ...]
    extra_rings: tuple[int, ...]
    extra_ring_batches: tuple[int, ...]
    verify_batches: tuple[int, ...]
    drafts: tuple[int, ...]
    verify_chunk: int
    steps: int
    replays: int
    trials: int
    extra_chunks: tuple[int, ...] = ()        # more chunk sizes of ours buffered ...
    extra_chunk_batches: tuple[int, ...] = ()  # ... at these batch sizes
    tunings: tuple[Tuning, ...] = (Tuning(),)  # one row of ours per tuning
    verify_tunings: tuple[Tuning, ...] = ()    # verify's rows (default: `tunings`)


PRESETS: dict[str, Plan] = {
    "full": Plan(batches=(1, 8, 32, 64, 128, 256, 512), chunks=(8, 16, 32, 64), rings=(16,), extra_rings=(8, 32),
                 extra_ring_batches=(64, 256), verify_batches=(8, 32, 64, 128, 256), drafts=(2, 4, 8),
                 verify_chunk=16, steps=16, replays=8, trials=5),
    "quick": Plan(batches=(1, 64, 256), chunks=(16, 64), rings=(16,), extra_rings=(8, 32), extra_ring_batches=(64,),
                  verify_batches=(64, 256), drafts=(4,), verify_chunk=16, steps=16, replays=4, trials=3),
    "dry": Plan(batches=(1, 3), chunks=(4, 8), rings=(16,), extra_rings=(8,), extra_ring_batches=(3,),
                verify_batches=(3,), drafts=(2, 4), verify_chunk=8, steps=4, replays=1, trials=1),
}


@dataclass(frozen=True)
class Params:
    A_log: torch.Tensor    # [HV] fp32
    dt_bias: torch.Tensor  # [HV] fp32
    scale: float


@dataclass
class Env:
    dims: Dims
    plan: Plan
    device: torch.device
    backend: str                 # backend of our ops
    ops: Any                     # kvbuffer.kernels.ops
    reference: Any               # kvbuffer.kernels.reference
    buffer_pool: Any             # kvbuffer.kernels.pools.BufferPool
    sgl: Any | None              # SimpleNamespace of SGLang kernels (load_sglang_kernels.load)
    fla: Callable[..., Any] | None
    params: Params
    gen: torch.Generator         # on the device, for the large random tensors
    cpu_gen: torch.Generator     # permutations and small integers
    ring_dtype: torch.dtype      # ReplaySSM ring records
    act_dtype: torch.dtype       # q, k, v, a, b, outputs: bf16 (dry run fp32: the interpreter's bf16 dot is off)
    methods: tuple[str, ...] = ()
    copy_bw: float | None = None  # bytes/s, read + write
    deadline: float = math.inf    # time.perf_counter() past which no new row starts
    notes: list[str] = field(default_factory=list)

    @property
    def graphs(self) -> bool:
        return self.device.type == "cuda"


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


def import_kernels() -> tuple[Any, Any, Any]:
    """kvbuffer.kernels, installed or straight from the repo (on the GPU machine only the repo travels)."""
    try:
        import kvbuffer.kernels as kernels
    except ImportError:
        pkg = types.ModuleType("kvbuffer")
        pkg.__path__ = []
        sys.modules["kvbuffer"] = pkg
        spec = importlib.util.spec_from_file_location(
            "kvbuffer.kernels", REPO / "kernels" / "__init__.py",
            submodule_search_locations=[str(REPO / "kernels")])
        assert spec is not None and spec.loader is not None
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["kvbuffer.kernels"] = kernels
        spec.loader.exec_module(kernels)
    from kvbuffer.kernels import ops, reference
    return ops, reference, kernels.BufferPool


def load_sglang(loader: Path, anchors: Path) -> Any:
    """SGLang's GDN kernels through the shared loader (a copy at .anchors/load_sglang_kernels.py)."""
    try:
        import packaging.version  # SGLang's fla utils import it
    except ImportError:
        from torch._vendor import packaging
        sys.modules["packaging"] = packaging
        sys.modules["packaging.version"] = packaging.version
    spec = importlib.util.spec_from_file_location("load_sglang_kernels", loader)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no loader at {loader}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(str(anchors))


def load_fla() -> Callable[..., Any]:
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    return fused_recurrent_gated_delta_rule


@triton.jit
def _interpreted_exp(x):
    return tl.exp(x)


def interpreter_fixups() -> None:
    """Dry run only: the Triton interpreter patches `tl.*` but not module-level aliases of them such as SGLang's
    and fla's `exp = tl.exp`; route those through a jit function. Compiled kernels never see this."""
    for name, module in list(sys.modules.items()):
        if name.startswith(("sglang.", "fla.")) and getattr(module, "exp", None) is tl.exp:
            module.exp = _interpreted_exp


def make_params(dims: Dims, device: torch.device, gen: torch.Generator) -> Params:
    """Qwen3-Next's A = U(1, 16) and a Mamba-style dt_bias (softplus^-1 of dt in [1e-3, 1e-1]).

    With a ~ 0.5 randn (SGLang's tests) the per-token log decay is about -A * dt: from -1e-3 to about -2,
    the range of a trained model, so old buffer entries still matter in the correctness check.
    """
    A_log = torch.empty(dims.HV, device=device).uniform_(1.0, 16.0, generator=gen).log()
    dt = torch.empty(dims.HV, device=device).uniform_(math.log(1e-3), math.log(1e-1), generator=gen).exp()
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    return Params(A_log=A_log, dt_bias=dt_bias, scale=dims.K ** -0.5)


# ---------------------------------------------------------------------------------------------------------
# Inputs and pools
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tokens:
    """`steps` sets of N tokens: SGLang's packed q|k|v and contiguous split copies of the same numbers."""

    mixed: torch.Tensor  # [steps, N, 2*H*K + HV*V] (bf16)
    q: torch.Tensor      # [steps, N, H, K]
    k: torch.Tensor
    v: torch.Tensor      # [steps, N, HV, V]
    a: torch.Tensor      # [steps, N, HV], SGLang's tests: 0.5 * randn
    b: torch.Tensor      # [steps, N, HV], randn

    def split(self, s: int) -> tuple[torch.Tensor, ...]:
        return self.q[s], self.k[s], self.v[s], self.a[s], self.b[s]


@dataclass(frozen=True)
class Batch:
    B: int               # requests
    T: int               # tokens per request per step (1: decode)
    tok: Tokens
    S0: torch.Tensor     # [B, HV, V, K] fp32: each request's checkpoint, request order (SGLang's tests: randn)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return torch.arange(0, self.B * self.T + 1, self.T, dtype=torch.int32, device=self.S0.device)


def make_batch(env: Env, B: int, T: int) -> Batch:
    d, dev, g, steps = env.dims, env.device, env.gen, env.plan.steps
    N = B * T
    mixed = torch.randn(steps, N, d.qkv_dim, device=dev, dtype=env.act_dtype, generator=g)
    q, k, v = mixed.split([d.H * d.K, d.H * d.K, d.HV * d.V], dim=-1)
    tok = Tokens(mixed=mixed,
                 q=q.reshape(steps, N, d.H, d.K).contiguous(),
                 k=k.reshape(steps, N, d.H, d.K).contiguous(),
                 v=v.reshape(steps, N, d.HV, d.V).contiguous(),
                 a=torch.randn(steps, N, d.HV, device=dev, dtype=env.act_dtype, generator=g) * 0.5,
                 b=torch.randn(steps, N, d.HV, device=dev, dtype=env.act_dtype, generator=g))
    S0 = torch.randn(B, d.HV, d.V, d.K, device=dev, generator=g)
    return Batch(B=B, T=T, tok=tok, S0=S0)


def permutation(env: Env, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=env.cpu_gen).to(device=env.device, dtype=torch.int32)


def make_pool(env: Env, S0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A state pool holding request i's checkpoint at slot slots[i] (a random permutation)."""
    slots = permutation(env, S0.shape[0])
    pool = torch.empty_like(S0)
    pool[slots.long()] = S0
    return pool, slots


def staggered(B: int, n: int, device: torch.device) -> torch.Tensor:
    """Request i starts with (n - 1 - i) % n entries: request 0 flushes on the first step."""
    return ((n - 1 - torch.arange(B, device=device)) % n).to(torch.int32)


def log_decay(env: Env, a: torch.Tensor) -> torch.Tensor:
    """g = -exp(A_log) softplus(a + dt_bias) for a `[n, HV, L]`."""
    p = env.params
    return -p.A_log.exp()[:, None] * F.softplus(a + p.dt_bias[:, None])


def fill_buffer(env: Env, buffer: Any) -> None:
    """Random entries at every position (a kernel that reads past buf_lens sees garbage, not zeros)."""
    g = env.gen
    buffer.keys.copy_(torch.randn(buffer.keys.shape, device=env.device, generator=g))
    buffer.values.copy_(torch.randn(buffer.values.shape, device=env.device, generator=g) * 0.5)
    a = torch.randn(buffer.decay.shape, device=env.device, generator=g) * 0.5
    buffer.decay.copy_(log_decay(env, a).cumsum(-1))


def folded_states(env: Env, pool: torch.Tensor, buffer: Any, buf_slots: torch.Tensor, buf_lens: torch.Tensor,
                  slots: torch.Tensor) -> torch.Tensor:
    """The state each request logically holds: its checkpoint with its buffer folded in (PyTorch reference)."""
    scratch = pool.clone()
    env.reference.fold(scratch, buffer, buf_slots, buf_lens, slots, slots)
    return scratch[slots.long()]


# ---------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------

def fp64_recurrence(env: Env, bt: Batch, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs `[B*T, HV, V]` of step 0 and the final states `[B, HV, V, K]`, by the fp64 PyTorch recurrence."""
    q, k, v, a, b = (x.double().unflatten(0, (bt.B, bt.T)) for x in bt.tok.split(0))
    states = start.double()
    slots = torch.arange(bt.B, device=env.device)
    p = env.params
    outs = [env.reference.recurrent_decode(q[:, t], k[:, t], v[:, t], a[:, t], b[:, t], p.A_log, p.dt_bias, states,
                                           slots, p.scale) for t in range(bt.T)]
    return torch.stack(outs, 1).flatten(0, 1), states


def sgl_reference(env: Env, bt: Batch, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What step 0 must produce from `start`: SGLang's recurrent kernel (decode, or verify for T > 1)."""
    if env.sgl is None:
        return fp64_recurrence(env, bt, start)
    pool = start.clone()
    idx = torch.arange(bt.B, device=env.device, dtype=torch.int32)
    tok, p = bt.tok, env.params
    if bt.T == 1:
        out = tok.mixed.new_empty(bt.B, 1, env.dims.HV, env.dims.V)
        env.sgl.packed_decode(mixed_qkv=tok.mixed[0], a=tok.a[0], b=tok.b[0], A_log=p.A_log, dt_bias=p.dt_bias,
                              scale=p.scale, initial_state=pool, out=out, ssm_state_indices=idx,
                              use_qk_l2norm_in_kernel=True)
        return out[:, 0], pool
    # called exactly as the timed `sgl verify` row calls it, so the compiled kernel is shared
    inter = torch.empty(bt.B, bt.T, *start.shape[1:], device=env.device)
    out = env.sgl.sigmoid_gating_update(
        A_log=p.A_log, a=tok.a[0], dt_bias=p.dt_bias, softplus_beta=1.0, softplus_threshold=20.0,
        q=tok.q[0][None], k=tok.k[0][None], v=tok.v[0][None], b=tok.b[0], initial_state_source=pool,
        initial_state_indices=idx, scale=p.scale, cu_seqlens=bt.cu_seqlens, use_qk_l2norm_in_kernel=True,
        is_kda=False, disable_state_update=True, intermediate_states_buffer=inter, intermediate_state_indices=idx,
        cache_steps=bt.T, retrieve_parent_token=None)
    return out[0], None


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------------------
# Cases: one method at one configuration
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Case:
    step: Callable[[int], torch.Tensor]    # step s on input set s, bookkeeping included; returns the outputs
    reference: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]  # step 0's outputs, states after it
    written: Callable[[], tuple[torch.Tensor, torch.Tensor] | None]    # after step 0: (rows written, states)
    model_bytes: float                      # bytes per step by the DESIGN.md section-3 model
    bookkeeping: Callable[[int], None] | None = None


def _rows(mask: torch.Tensor, pool: torch.Tensor,
          slots: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """After step 0: the rows in `mask` and their states in the pool (request order)."""
    return lambda: (mask, pool[slots.long()][mask])


def case_sgl_recurrent(env: Env, bt: Batch) -> Case:
    """fused_recurrent_gated_delta_rule_packed_decode, as TritonGDNKernel.packed_decode calls it."""
    d, p, tok, sgl = env.dims, env.params, bt.tok, env.sgl
    pool, slots = make_pool(env, bt.S0)
    out = tok.mixed.new_empty(bt.B, 1, d.HV, d.V)

    def step(s: int) -> torch.Tensor:
        sgl.packed_decode(mixed_qkv=tok.mixed[s], a=tok.a[s], b=tok.b[s], A_log=p.A_log, dt_bias=p.dt_bias,
                          scale=p.scale, initial_state=pool, out=out, ssm_state_indices=slots,
                          use_qk_l2norm_in_kernel=True)
        return out[:, 0]

    everyone = torch.ones(bt.B, dtype=torch.bool, device=env.device)
    return Case(step=step, reference=partial(fp64_recurrence, env, bt, bt.S0), written=_rows(everyone, pool, slots),
                model_bytes=bt.B * 2 * d.state_bytes)


def replay_states(S0: torch.Tensor, d_ring: torch.Tensor, k_ring: torch.Tensor, g_ring: torch.Tensor,
                  write_pos: torch.Tensor) -> torch.Tensor:
    """ReplaySSM's state before the step: e^{sum g} S0 + sum_{j < write_pos} e^{sum g - cumsum_j g} d_j k_j^T."""
    L = g_ring.shape[-1]
    valid = (torch.arange(L, device=S0.device)[None, :] < write_pos[:, None])[:, None, :]   # [B, 1, L]
    g = torch.where(valid, g_ring, 0.0)
    total = g.sum(-1, keepdim=True)
    w = torch.where(valid, (total - g.cumsum(-1)).exp(), 0.0)
    keys = k_ring.float().repeat_interleave(d_ring.shape[1] // k_ring.shape[1], dim=1)
    return total.exp()[..., None] * S0 + torch.einsum("bhl,bhlv,bhlk->bhvk", w, d_ring.float(), keys)


def case_sgl_replayssm(env: Env, bt: Batch, L: int) -> Case:
    """fused_recurrent_gdn_replayssm_decode with SGLang's rings (d, normalized k, per-token g; slot-indexed).

    Bookkeeping: write_pos = (write_pos + 1) % L, the cursor advance of HybridLinearAttnBackend (its flush
    at write_pos == L - 1 happens in the kernel; force_flush=None as with radix tracking off).
    """
    d, p, tok, sgl, dev, g = env.dims, env.params, bt.tok, env.sgl, env.device, env.gen
    pool, slots = make_pool(env, bt.S0)
    n = bt.B
    d_ring = (torch.randn(n, d.HV, L, d.V, device=dev, generator=g) * 0.5).to(env.ring_dtype)
    k_ring = F.normalize(torch.randn(n, d.H, L, d.K, device=dev, generator=g), dim=-1).to(env.ring_dtype)
    g_ring = log_decay(env, torch.randn(n, d.HV, L, device=dev, generator=g) * 0.5)
    pos0 = staggered(bt.B, L, dev)
    write_pos = pos0.clone()
    idx = slots.long()
    start = replay_states(bt.S0, d_ring[idx], k_ring[idx], g_ring[idx], pos0)
    out = tok.mixed.new_empty(bt.B, 1, d.HV, d.V)

    def bookkeeping(s: int) -> None:
        write_pos.add_(1).remainder_(L)

    def step(s: int) -> torch.Tensor:
        sgl.replayssm_decode(mixed_qkv=tok.mixed[s], a=tok.a[s], b=tok.b[s], A_log=p.A_log, dt_bias=p.dt_bias,
                             scale=p.scale, initial_state=pool, d_cache=d_ring, k_cache=k_ring, g_cache=g_ring,
                             out=out, ssm_state_indices=slots, write_pos=write_pos, use_qk_l2norm_in_kernel=True)
        bookkeeping(s)
        return out[:, 0]

    entry = d.entry_bytes(env.ring_dtype.itemsize, env.ring_dtype.itemsize)
    return Case(step=step, reference=partial(sgl_reference, env, bt, start),
                written=_rows(pos0 == L - 1, pool, slots), bookkeeping=bookkeeping,
                model_bytes=bt.B * (d.state_bytes + L * entry + d.state_bytes / L))


def case_fla(env: Env, bt: Batch) -> Case:
    """fla-core's fused_recurrent_gated_delta_rule, gate and beta sigmoid in kernel, V-first state layout.

    fla takes no slot indices: its states are the request-ordered pool, each step reads the previous step's
    state and writes a fresh one (step 0 reads the pool), so it moves a full state in and out like the rest.
    """
    d, p, tok, fla = env.dims, env.params, bt.tok, env.fla
    pool = bt.S0.clone()
    last: list[torch.Tensor] = [pool]

    def step(s: int) -> torch.Tensor:
        q, k, v, a, b = (x[:, None] for x in tok.split(s))
        o, final = fla(q, k, v, g=a, beta=b, scale=p.scale, initial_state=pool if s == 0 else last[0],
                       output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                       A_log=p.A_log, dt_bias=p.dt_bias, use_beta_sigmoid_in_kernel=True, state_v_first=True)
        last[0] = final
        return o[:, 0]

    everyone = torch.ones(bt.B, dtype=torch.bool, device=env.device)
    return Case(step=step, reference=partial(sgl_reference, env, bt, bt.S0), written=lambda: (everyone, last[0]),
                model_bytes=bt.B * 2 * d.state_bytes)


def case_ours_recurrent(env: Env, bt: Batch) -> Case:
    d, p, tok = env.dims, env.params, bt.tok
    pool, slots = make_pool(env, bt.S0)

    def step(s: int) -> torch.Tensor:
        return env.ops.recurrent_decode(*tok.split(s), p.A_log, p.dt_bias, pool, slots, scale=p.scale,
                                        backend=env.backend, check_values=False)

    everyone = torch.ones(bt.B, dtype=torch.bool, device=env.device)
    return Case(step=step, reference=partial(sgl_reference, env, bt, bt.S0), written=_rows(everyone, pool, slots),
                model_bytes=bt.B * 2 * d.state_bytes)


@dataclass
class Buffered:
    """Checkpoint pool + buffer pool of our ops, staggered; `start` is what each request logically holds."""

    pool: torch.Tensor
    slots: torch.Tensor       # read slots (= write slots of a flush)
    buffer: Any
    buf_slots: torch.Tensor
    lens0: torch.Tensor       # buf_lens at the start
    buf_lens: torch.Tensor
    start: torch.Tensor


def make_buffered(env: Env, bt: Batch, chunk: int, capacity: int) -> Buffered:
    d = env.dims
    pool, slots = make_pool(env, bt.S0)
    buffer = env.buffer_pool.allocate(bt.B, capacity, d.H, d.HV, d.K, d.V, key_dtype=env.act_dtype,
                                      device=env.device)
    fill_buffer(env, buffer)
    buf_slots = permutation(env, bt.B)
    lens0 = staggered(bt.B, chunk, env.device)
    start = folded_states(env, pool, buffer, buf_slots, lens0, slots)
    return Buffered(pool=pool, slots=slots, buffer=buffer, buf_slots=buf_slots, lens0=lens0, buf_lens=lens0.clone(),
                    start=start)


def case_ours_buffered(env: Env, bt: Batch, chunk: int, tuning: Tuning) -> Case:
    """ops.buffered_decode, flush fused; bookkeeping: write_slots = where(buf_lens + 1 == chunk, read, -1) before,
    buf_lens = where(flushed, 0, buf_lens + 1) after (written as (buf_lens + 1) % chunk)."""
    d, p, tok = env.dims, env.params, bt.tok
    st = make_buffered(env, bt, chunk, chunk + 8)
    write_slots, no_slot = torch.full_like(st.slots, -1), torch.full_like(st.slots, -1)

    def before() -> None:
        torch.where(st.buf_lens == chunk - 1, st.slots, no_slot, out=write_slots)

    def after() -> None:
        st.buf_lens.add_(1).remainder_(chunk)

    def bookkeeping(s: int) -> None:
        before()
        after()

    def step(s: int) -> torch.Tensor:
        before()
        with tuning.applied("decode", env.device):
            o = env.ops.buffered_decode(*tok.split(s), p.A_log, p.dt_bias, st.pool, st.buffer, st.buf_slots,
                                        st.buf_lens, st.slots, write_slots, scale=p.scale, backend=env.backend,
                                        check_values=False, tuning=tuning.kernel_args())
        after()
        return o

    entry = d.entry_bytes(2, 4)
    return Case(step=step, reference=partial(sgl_reference, env, bt, st.start),
                written=_rows(st.lens0 == chunk - 1, st.pool, st.slots), bookkeeping=bookkeeping,
                model_bytes=bt.B * (d.state_bytes + chunk * entry + d.state_bytes / chunk))


@triton.jit
def _scatter_accepted_kernel(src, dst, dst_slots, src_rows, steps, src_row_stride, src_step_stride, dst_slot_stride,
                             ELEMS: tl.constexpr, BLOCK: tl.constexpr):
    """dst[dst_slots[i]] = src[src_rows[i], steps[i]], one pass, as SGLang's fused_mamba_state_scatter_with_mask."""
    i = tl.program_id(0)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < ELEMS
    step = tl.load(steps + i).to(tl.int64)
    row = tl.load(src_rows + i).to(tl.int64)
    slot = tl.load(dst_slots + i).to(tl.int64)
    x = tl.load(src + row * src_row_stride + step * src_step_stride + offs, mask=mask)
    tl.store(dst + slot * dst_slot_stride + offs, x, mask=mask)


def scatter_accepted(src: torch.Tensor, dst: torch.Tensor, dst_slots: torch.Tensor, src_rows: torch.Tensor,
                     steps: torch.Tensor) -> None:
    elems = dst[0].numel()
    block = 1024
    _scatter_accepted_kernel[(steps.shape[0], triton.cdiv(elems, block))](
        src, dst, dst_slots, src_rows, steps, src.stride(0), src.stride(1), dst.stride(0), ELEMS=elems, BLOCK=block)


def accepted_counts(env: Env, B: int, T: int) -> torch.Tensor:
    return torch.randint(1, T + 1, (B,), generator=env.cpu_gen).to(device=env.device, dtype=torch.int32)


def case_sgl_verify(env: Env, bt: Batch, commit: bool) -> Case:
    """fused_sigmoid_gating_delta_rule_update as TritonGDNKernel.target_verify calls it: disable_state_update,
    one state per draft token into intermediate_states_buffer `[pool + 1, T, HV, V, K]` (MambaPool's
    intermediate_ssm of one layer), rows from build_verify_intermediate_state_indices (request i -> row i).
    With `commit`, also the accepted state into the pool (update_mamba_state_after_mtp_verify)."""
    d, p, tok, sgl, T = env.dims, env.params, bt.tok, env.sgl, bt.T
    pool, slots = make_pool(env, bt.S0)
    inter = torch.empty(bt.B + 1, T, d.HV, d.V, d.K, device=env.device)
    rows = torch.arange(bt.B, device=env.device, dtype=torch.int32)
    last_step = accepted_counts(env, bt.B, T) - 1
    cu = bt.cu_seqlens

    def commit_step(s: int) -> None:
        scatter_accepted(inter, pool, slots, rows, last_step)

    def step(s: int) -> torch.Tensor:
        o = sgl.sigmoid_gating_update(
            A_log=p.A_log, a=tok.a[s], dt_bias=p.dt_bias, softplus_beta=1.0, softplus_threshold=20.0,
            q=tok.q[s][None], k=tok.k[s][None], v=tok.v[s][None], b=tok.b[s], initial_state_source=pool,
            initial_state_indices=slots, scale=p.scale, cu_seqlens=cu, use_qk_l2norm_in_kernel=True, is_kda=False,
            disable_state_update=True, intermediate_states_buffer=inter, intermediate_state_indices=rows,
            cache_steps=T, retrieve_parent_token=None)
        if commit:
            commit_step(s)
        return o[0]

    return Case(step=step, reference=partial(fp64_recurrence, env, bt, bt.S0), written=lambda: None,
                bookkeeping=commit_step if commit else None,
                model_bytes=bt.B * (1 + T + (2 if commit else 0)) * d.state_bytes)


def case_ours_verify(env: Env, bt: Batch, tuning: Tuning) -> Case:
    """ops.verify of T tokens per request from checkpoint + partly filled buffer (max_tokens=T: no read-back in the
    graph), then buf_lens + accepted (into a separate tensor, so every replay verifies from the same buffer)."""
    d, p, tok, T = env.dims, env.params, bt.tok, bt.T
    chunk = env.plan.verify_chunk
    st = make_buffered(env, bt, chunk, chunk + max(8, T))
    accepted = accepted_counts(env, bt.B, T)
    committed = torch.empty_like(st.buf_lens)
    cu = bt.cu_seqlens

    def commit(s: int) -> None:
        torch.add(st.buf_lens, accepted, out=committed)

    def step(s: int) -> torch.Tensor:
        with tuning.applied("verify", env.device):
            o = env.ops.verify(*tok.split(s), p.A_log, p.dt_bias, st.pool, st.buffer, cu, st.buf_slots,
                               st.buf_lens, st.slots, scale=p.scale, backend=env.backend, check_values=False,
                               max_tokens=T, tuning=tuning.kernel_args())
        commit(s)
        return o

    entry = d.entry_bytes(2, 4)
    return Case(step=step, reference=partial(sgl_reference, env, bt, st.start), written=lambda: None,
                bookkeeping=commit, model_bytes=bt.B * (d.state_bytes + (chunk + T) * entry))


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------

def time_steps(env: Env, fn: Callable[[int], Any]) -> float:
    """Mean microseconds per step: `steps` consecutive steps in one CUDA graph, replayed; median over trials."""
    plan = env.plan
    if not env.graphs:  # dry run: eager, only to exercise the path
        t0 = time.perf_counter()
        for _ in range(plan.trials * plan.replays):
            for s in range(plan.steps):
                fn(s)
        return (time.perf_counter() - t0) * 1e6 / (plan.trials * plan.replays * plan.steps)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: compilation, autotuning, allocator
        for s in range(plan.steps):
            fn(s)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in range(plan.steps):
            fn(s)
    graph.replay()
    torch.cuda.synchronize()
    means = []
    for _ in range(plan.trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(plan.replays):
            graph.replay()
        end.record()
        end.synchronize()
        means.append(start.elapsed_time(end) * 1e3 / (plan.replays * plan.steps))
    del graph
    return statistics.median(means)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting read + write."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.ones(n // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    iters = 20 if device.type == "cuda" else 3
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
    return 2 * n * iters / seconds


# ---------------------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------------------

class ContextLost(RuntimeError):
    """The CUDA context is unusable (an illegal address, a device assert): nothing after can run."""


@dataclass
class Result:
    section: str                 # "decode" | "verify"
    batch: int
    tokens: int                  # T per request (1 for decode)
    method: str
    param: str
    baseline: bool
    us: float | None = None
    bookkeeping_us: float | None = None
    model_bytes: float = 0.0
    err_out: float | None = None
    err_state: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        good_out = self.err_out is not None and self.err_out < TOL_OUT
        good_state = self.err_state is None or self.err_state < TOL_STATE
        return self.error is None and good_out and good_state


def _cuda_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # a sticky error: every later call fails the same way
        return False


def run_case(env: Env, res: Result, build: Callable[[], Case]) -> Result:
    t0 = time.perf_counter()
    case: Case | None = None
    try:
        case = build()
        out_ref, states_ref = case.reference()
        res.err_out = rel_err(case.step(0), out_ref)
        written = case.written()
        if written is not None and states_ref is not None and bool(written[0].any()):
            res.err_state = rel_err(written[1], states_ref[written[0]])
        del out_ref, states_ref, written
        res.model_bytes = case.model_bytes
        res.us = time_steps(env, case.step)
        if case.bookkeeping is not None:
            res.bookkeeping_us = time_steps(env, case.bookkeeping)
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
    finally:
        del case
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    if not _cuda_alive(env.device):
        raise ContextLost(res.error or "CUDA context lost")
    us = "-" if res.us is None else f"{res.us:.1f} us"
    status = "ok" if res.ok else "FAIL"
    print(f"[{time.perf_counter() - t0:5.1f}s] {res.section} B={res.batch} {res.method} {res.param}: {us} {status}"
          + (f" ({res.error[:120]})" if res.error else ""), file=sys.stderr, flush=True)
    return res


def decode_cases(env: Env, bt: Batch) -> list[tuple[str, str, bool, Callable[[], Case]]]:
    plan = env.plan
    rings = plan.rings + (plan.extra_rings if bt.B in plan.extra_ring_batches else ())
    cases: list[tuple[str, str, bool, Callable[[], Case]]] = []
    if env.sgl is not None:
        cases.append(("sgl recurrent", "", True, partial(case_sgl_recurrent, env, bt)))
        cases += [("sgl replayssm", f"L={L}", False, partial(case_sgl_replayssm, env, bt, L)) for L in rings]
    if env.fla is not None:
        cases.append(("fla recurrent", "", False, partial(case_fla, env, bt)))
    cases.append(("ours recurrent", "", env.sgl is None, partial(case_ours_recurrent, env, bt)))
    chunks = plan.chunks + (plan.extra_chunks if bt.B in plan.extra_chunk_batches else ())
    cases += [("ours buffered", f"C={C} {tuning.spec}".rstrip(), False, partial(case_ours_buffered, env, bt, C, tuning))
              for C in chunks for tuning in plan.tunings if tuning.runs_at(bt.B)]
    return cases


def verify_cases(env: Env, bt: Batch) -> list[tuple[str, str, bool, Callable[[], Case]]]:
    cases: list[tuple[str, str, bool, Callable[[], Case]]] = []
    if env.sgl is not None:
        cases.append(("sgl verify", "", True, partial(case_sgl_verify, env, bt, False)))
        cases.append(("sgl verify+commit", "", False, partial(case_sgl_verify, env, bt, True)))
    cases += [("ours verify+commit", f"C={env.plan.verify_chunk} {tuning.spec}".rstrip(), env.sgl is None,
               partial(case_ours_verify, env, bt, tuning))
              for tuning in env.plan.verify_tunings or env.plan.tunings if tuning.runs_at(bt.B)]
    return cases


def wanted(env: Env, method: str, param: str) -> bool:
    name = f"{method} {param}"
    return not env.methods or any(m in name for m in env.methods)


def run_section(env: Env, section: str, batches: Sequence[int], drafts: Sequence[int], results: list[Result],
                save: Callable[[], None]) -> None:
    cases_of = decode_cases if section == "decode" else verify_cases
    for B in batches:
        for T in drafts:
            bt = make_batch(env, B, T)
            for method, param, baseline, build in cases_of(env, bt):
                if time.perf_counter() > env.deadline:
                    env.notes.append(f"--deadline passed: {section} rows from B={B} T={T} {method} {param} on did "
                                     "not run")
                    return
                if wanted(env, method, param):
                    res = Result(section=section, batch=B, tokens=T, method=method, param=param, baseline=baseline)
                    results.append(res)
                    try:
                        run_case(env, res, build)
                    finally:
                        save()
            del bt


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:  # the method column (1) left-aligned, numbers right-aligned
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in pairs)
    print(f"\n{title}")
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def ratios(results: Sequence[Result], section: str) -> dict[int, tuple[float | None, float | None]]:
    """Per result (by id) of a section: its time over the baseline's at the same (B, T), with and without its
    bookkeeping (which runs once per model step, not once per layer: the ratio without it is the per-layer cost)."""
    base = {(r.batch, r.tokens): r.us for r in results if r.section == section and r.baseline and r.ok}
    out: dict[int, tuple[float | None, float | None]] = {}
    for r in (r for r in results if r.section == section):
        ratio = None if r.us is None or base.get((r.batch, r.tokens)) is None else r.us / base[(r.batch, r.tokens)]
        out[id(r)] = (ratio, None if ratio is None else ratio * (1 - (r.bookkeeping_us or 0.0) / r.us))
    return out


def report(env: Env, results: Sequence[Result], section: str, title: str, base_name: str) -> None:
    rows = []
    by_result = ratios(results, section)
    for r in (r for r in results if r.section == section):
        ratio, bare = by_result[id(r)]
        bw = None if not r.us else r.model_bytes / (r.us * 1e-6)
        pct = None if bw is None or not env.copy_bw else 100 * bw / env.copy_bw
        check = "ok" if r.ok else ("ERROR" if r.error else "FAIL")
        rows.append([str(r.batch), f"{r.method} {r.param}".strip(), str(r.tokens), _fmt(r.us, ".1f"),
                     _fmt(r.bookkeeping_us, ".1f"), _fmt(ratio, ".2f"), _fmt(bare, ".2f"),
                     _fmt(None if bw is None else bw / 1e9, ".0f"),
                     _fmt(pct, ".0f"), _fmt(r.err_out, ".1e"), _fmt(r.err_state, ".1e"), check])
    if rows:
        print_table(title, ["B", "method", "T", "us", "of which bk", f"x {base_name}", "x w/o bk", "GB/s", "%copy",
                            "err out", "err state", "check"], rows)
    for r in results:
        if r.section == section and r.error:
            print(f"  ERROR B={r.batch} T={r.tokens} {r.method} {r.param}: {r.error}")


def pivot(results: Sequence[Result], section: str, title: str) -> None:
    """One line per method and configuration, one column per (B, T): its "x w/o bk" (a sweep's summary)."""
    by_result = ratios(results, section)
    mine = [r for r in results if r.section == section]
    columns = list(dict.fromkeys((r.batch, r.tokens) for r in mine))
    names = list(dict.fromkeys(f"{r.method} {r.param}".strip() for r in mine))
    cells = {(f"{r.method} {r.param}".strip(), (r.batch, r.tokens)): _fmt(by_result[id(r)][1], ".2f") if r.ok
             else "FAIL" for r in mine}
    header = ["", "method", *(f"B={b}" if section == "decode" else f"B={b} T={t}" for b, t in columns)]
    if names:
        print_table(title, header, [["", name, *(cells.get((name, c), "") for c in columns)] for name in names])


def legend(env: Env) -> None:
    copy = "-" if env.copy_bw is None else f"{env.copy_bw / 1e12:.2f} TB/s"
    print(f"""
us: mean per step (decode) or per call (verify), CUDA graph of {env.plan.steps} steps, median of {env.plan.trials} \
trials x {env.plan.replays} replays; "of which bk" is the bookkeeping alone (ours: write_slots/buf_lens updates; \
ReplaySSM: cursor advance; verify: the commit), timed by itself, included in us. GB/s: DESIGN.md section-3 bytes \
(recurrent 2S, buffered S + L*r + S/L, SGLang verify (1+T)S (+2S commit), ours verify S + (C+T)*r) over us; \
%copy: against the copy bandwidth {copy} (read+write). err out / err state: relative L2 error of step 0's outputs / \
written states against SGLang's recurrent kernel from the same logical state (SGLang rows: fp64 PyTorch recurrence); \
check FAIL (out >= {TOL_OUT:g} or state >= {TOL_STATE:g}) means the time is meaningless.""")
    for note in env.notes:
        print(f"note: {note}")


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", help="decode batch sizes")
    ap.add_argument("--chunks", type=int, nargs="+", help="chunk sizes of ours buffered (capacity chunk + 8)")
    ap.add_argument("--rings", type=int, nargs="+", help="ReplaySSM ring lengths at every batch size")
    ap.add_argument("--extra-rings", type=int, nargs="+", help="more ReplaySSM ring lengths ...")
    ap.add_argument("--extra-ring-batches", type=int, nargs="+", help="... at these batch sizes")
    ap.add_argument("--verify-batches", type=int, nargs="+", help="verify batch sizes")
    ap.add_argument("--drafts", type=int, nargs="+", help="draft tokens per request in verify")
    ap.add_argument("--verify-chunk", type=int, help="chunk size of ours verify (buffer lengths staggered below it)")
    ap.add_argument("--extra-chunks", type=int, nargs="+", help="more chunk sizes of ours buffered ...")
    ap.add_argument("--extra-chunk-batches", type=int, nargs="+", help="... at these batch sizes")
    ap.add_argument("--tunings", type=Tuning.parse, nargs="+",
                    help="launch parameters of our rows, one row each (see Tuning; e.g. auto two v16w1 h2p1 f16)")
    ap.add_argument("--verify-tunings", type=Tuning.parse, nargs="+",
                    help="verify's rows, one per tuning (default: --tunings; e.g. auto v64w2 v64w2n4 k64n2)")
    ap.add_argument("--deadline", type=float,
                    help="seconds after start past which no new row starts (the tables cover what ran)")
    ap.add_argument("--steps", type=int, help="consecutive steps per CUDA graph")
    ap.add_argument("--replays", type=int, help="graph replays per trial")
    ap.add_argument("--trials", type=int, help="trials (median reported)")
    ap.add_argument("--quick", action="store_true", help="fewer configurations, for a short run")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: tiny shapes, our ops on --backend torch, SGLang/fla kernels under TRITON_INTERPRET")
    ap.add_argument("--skip", choices=["decode", "verify"], action="append", default=[], help="skip a section")
    ap.add_argument("--methods", default="", help="comma-separated substrings of the methods to run (default all)")
    ap.add_argument("--backend", choices=["triton", "torch", "auto"], help="backend of our ops (default triton)")
    ap.add_argument("--anchors", default=".anchors", help="folder get_sglang_kernels.sh unpacked SGLang into")
    ap.add_argument("--loader", help="load_sglang_kernels.py (default: ANCHORS/load_sglang_kernels.py)")
    ap.add_argument("--no-sglang", action="store_true", help="run without SGLang's kernels")
    ap.add_argument("--no-fla", action="store_true", help="run without fla-core")
    ap.add_argument("--replayssm-ring-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="ReplaySSM ring records (SGLang's MambaPool: the SSM dtype, fp32)")
    ap.add_argument("--json", help="write the results here (rewritten after every case)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = PRESETS["dry" if args.dry_run else "quick" if args.quick else "full"]
    given = {name: getattr(args, name) for name in Plan.__dataclass_fields__ if getattr(args, name, None)}
    return replace(plan, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def build_env(args: argparse.Namespace, device: torch.device) -> Env:
    dims = Dims(H=2, HV=4, K=32, V=32) if args.dry_run else Dims()
    notes: list[str] = []
    ops, reference, buffer_pool = import_kernels()
    sgl = fla = None
    if not args.no_sglang:
        anchors = _resolve(args.anchors)
        try:
            sgl = load_sglang(_resolve(args.loader) if args.loader else anchors / "load_sglang_kernels.py", anchors)
        except Exception as e:
            notes.append(f"SGLang kernels unavailable ({type(e).__name__}: {e}); references fall back to fp64 PyTorch")
    if not args.no_fla:
        try:
            fla = load_fla()
        except Exception as e:
            notes.append(f"fla-core unavailable ({type(e).__name__}: {e})")
    if os.environ.get("TRITON_INTERPRET") == "1":
        interpreter_fixups()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    return Env(dims=dims, plan=make_plan(args), device=device,
               backend=args.backend or ("torch" if args.dry_run else "triton"), ops=ops, reference=reference,
               buffer_pool=buffer_pool, sgl=sgl, fla=fla, params=make_params(dims, device, gen), gen=gen,
               cpu_gen=torch.Generator().manual_seed(args.seed),
               ring_dtype=torch.float32 if args.replayssm_ring_dtype == "fp32" else torch.bfloat16,
               act_dtype=torch.float32 if args.dry_run else torch.bfloat16,
               methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), notes=notes)


def describe(env: Env) -> dict[str, Any]:
    dev = torch.cuda.get_device_name(env.device) if env.graphs else platform.processor() or "cpu"
    fla_version = sys.modules["fla"].__version__ if "fla" in sys.modules else None
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "fla": fla_version,
            "python": platform.python_version(), "dims": asdict(env.dims), "plan": asdict(env.plan),
            "backend": env.backend, "sglang": env.sgl is not None, "copy_bw": env.copy_bw,
            "ring_dtype": str(env.ring_dtype)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton picks interpreter or compiler when a kernel is defined: start again with the interpreter on.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (try --dry-run)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the PyTorch references stay fp32/fp64
    env = build_env(args, device)
    if args.deadline is not None:
        env.deadline = time.perf_counter() + args.deadline
    env.copy_bw = copy_bandwidth(device)
    meta = describe(env)
    print(" ".join(f"{k}={v}" for k, v in meta.items() if k not in ("dims", "plan")))
    print(f"dims={meta['dims']} state={env.dims.state_bytes / 2**20:.1f} MiB copy={env.copy_bw / 1e12:.3f} TB/s")
    for note in env.notes:
        print(f"note: {note}")
    results: list[Result] = []

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))

    plan, lost = env.plan, None
    with torch.no_grad():
        try:
            if "decode" not in args.skip:
                run_section(env, "decode", plan.batches, (1,), results, save)
            if "verify" not in args.skip:
                run_section(env, "verify", plan.verify_batches, plan.drafts, results, save)
        except ContextLost as e:
            lost = str(e)
    report(env, results, "decode", "Decode, one GDN layer (us per step)", "sgl rec")
    report(env, results, "verify", "Speculative verify, one GDN layer (us per call)", "sgl verify")
    legend(env)
    pivot(results, "verify", "Verify x SGLang's recurrent verify w/o bookkeeping, by batch and draft tokens")
    pivot(results, "decode", "Decode x SGLang recurrent w/o bookkeeping, by batch")
    if lost:
        print(f"\nSTOPPED: the CUDA context was lost ({lost}); rerun the rest with --methods/--skip.")
    return 1 if lost or any(not r.ok for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
