"""SGLang 0.5.17's real GDN attention backend on the CPU (or a GPU where there is one), for the plugin's tests.

What runs is SGLang's: `HybridReqToTokenPool` / `MambaPool` (state and conv pools in SGLang's layout),
`GDNAttnBackend` (metadata, causal conv, split, radix tracking) and its Triton kernels under TRITON_INTERPRET=1.
Stand-ins, for what cannot run here (SGLang's scheduler and model runner, which need a GPU engine): `runner`
carries the few attributes the backend reads, and `batch` the ForwardBatch fields its GDN path reads.

Two shims make `import sglang` work on a CPU machine, both outside SGLang's GDN path:
- the only torchvision on PyPI is a CUDA build; beside a CPU torch its C++ ops do not load and torchvision then
  fails registering their fake kernels at import. It is installed into `.sglang-cpu/` (not site-packages, where
  transformers would import it for every other test) and added to the path here, with those two registration
  modules skipped (SGLang's GDN path never calls torchvision ops; it imports torchvision for multimodal
  preprocessing).
- transformers newer than SGLang's pin (5.12.1) already registers `qwen3_asr`; SGLang registers it again at import.
  Registration is made tolerant while SGLang is imported (the GPU wheel set patches the file instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the same tests are the plugin's smoke test
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


H200_MEMORY_MIB = 141 * 1024
TORCHVISION_DIR = Path(__file__).resolve().parent.parent / ".sglang-cpu"  # .ci/run installs torchvision there


def import_sglang() -> None:
    """Imports SGLang's GDN path (and so its ServerArgs and sampling modules) with the two shims above."""
    if TORCHVISION_DIR.is_dir() and str(TORCHVISION_DIR) not in sys.path:
        sys.path.append(str(TORCHVISION_DIR))
    try:
        import torchvision  # noqa: F401
    except RuntimeError:  # a CUDA torchvision beside a CPU torch: skip its op registrations (see above)
        for name in list(sys.modules):
            if name.startswith("torchvision"):
                del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
    except ImportError:
        pass
    from transformers import AutoConfig

    register = AutoConfig.register

    def tolerant(model_type, config, exist_ok=False):
        return register(model_type, config, exist_ok=True)

    AutoConfig.register = tolerant
    try:
        import sglang.srt.layers.attention.hybrid_linear_attn_backend
        import sglang.srt.layers.attention.linear.gdn_backend
        import sglang.srt.server_args  # noqa: F401
    finally:
        AutoConfig.register = register


def require_sglang() -> None:
    """Skips the calling test module, with the reason, where SGLang 0.5.17 cannot be imported."""
    try:
        import_sglang()
    except Exception as e:  # any import failure: a missing optional package, another SGLang release
        pytest.skip(f"sglang is not importable here ({type(e).__name__}: {e}); .ci/run installs it",
                    allow_module_level=True)
    import sglang
    from kvbuffer.service.sglang.version import SGLANG_VERSION

    if sglang.__version__ != SGLANG_VERSION:
        pytest.skip(f"sglang {sglang.__version__} installed, the plugin pins {SGLANG_VERSION}",
                    allow_module_level=True)


@dataclass(frozen=True)
class Shapes:
    H: int = 2  # key heads
    HV: int = 4  # value heads
    K: int = 16
    V: int = 16
    conv_kernel: int = 4
    layers: int = 2
    requests: int = 4  # req-to-token slots
    mamba_slots: int = 6

    @property
    def conv_dim(self) -> int:
        return 2 * self.H * self.K + self.HV * self.V


def cache_params(s: Shapes, dtype: torch.dtype = torch.float32, dedup_windows: bool = True):
    """SGLang's Mamba2CacheParams of a GDN layer stack at `s` (conv and state in `dtype`); dedup_windows=False sets
    SGLang's own switch for one conv window per draft step instead of its overlapping layout."""
    from sglang.srt.configs.mamba_utils import Mamba2CacheParams, Mamba2StateDType, Mamba2StateShape

    shape = Mamba2StateShape.create(tp_world_size=1, intermediate_size=s.HV * s.V, n_groups=s.H, num_heads=s.HV,
                                    head_dim=s.V, state_size=s.K, conv_kernel=s.conv_kernel,
                                    conv_shard_groups=[s.H * s.K, s.H * s.K, s.HV * s.V])
    return Mamba2CacheParams(shape=dataclasses.replace(shape, disable_conv_window_dedup=not dedup_windows),
                             layers=list(range(s.layers)), dtype=Mamba2StateDType(conv=dtype, temporal=torch.float32))


def new_pool(s: Shapes, draft_tokens: int | None = None, per_draft_states: bool = True, extra_buffer: bool = False):
    """SGLang's HybridReqToTokenPool on DEVICE (fp32 conv and state). With draft_tokens, speculative state for chain
    drafts: per_draft_states makes SGLang's (per-draft states and conv windows, dense; its allocation hard-codes
    CUDA, so the same tensors are made here), for the recurrent oracle; otherwise SGLang's constructor is asked for
    it, which the plugin's hook (memory.py) answers without per-draft states. With extra_buffer, the ping-pong track
    slots of the radix cache's extra_buffer strategy."""
    from sglang.srt.mem_cache.memory_pool import HybridReqToTokenPool, MambaPool

    ask = draft_tokens if not per_draft_states else None
    pool = HybridReqToTokenPool(size=s.requests, mamba_size=s.mamba_slots, mamba_spec_state_size=s.requests,
                                max_context_len=256, device=DEVICE, enable_memory_saver=False,
                                cache_params=cache_params(s), mamba_layer_ids=list(range(s.layers)),
                                enable_mamba_extra_buffer=extra_buffer, speculative_num_draft_tokens=ask,
                                speculative_eagle_topk=1 if ask else None)
    if draft_tokens and per_draft_states:
        cache = pool.mamba_pool.mamba_cache
        windows = [torch.zeros(s.layers, s.requests + 1, draft_tokens, *conv.shape[2:], device=DEVICE)
                   for conv in cache.conv]
        pool.mamba_pool.mamba_cache = MambaPool.SpeculativeState(
            conv=cache.conv, temporal=cache.temporal, intermediate_ssm=torch.zeros(
                s.layers, s.requests + 1, draft_tokens, *cache.temporal.shape[2:], device=DEVICE),
            intermediate_conv_window=windows)
    return pool


def server_args(**overrides: object):
    """SGLang's ServerArgs with its declared defaults and `overrides`, published as the process's runtime context.
    Its __post_init__ (which resolves everything against a model on disk and a GPU) is not run."""
    from sglang.srt.runtime_context import get_context
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs.__new__(ServerArgs)
    for f in dataclasses.fields(ServerArgs):
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        setattr(args, f.name, factory() if factory else (None if f.default is dataclasses.MISSING else f.default))
    for name, value in overrides.items():
        setattr(args, name, value)
    get_context().set_server_args(args)
    return args


def new_backend(pool, draft_tokens: int | None = None, ranks: dict[str, int] | None = None, **args: object):
    """SGLang's GDNAttnBackend over `pool` (its __init__ runs the plugin's hook when the plugin is loaded); `ranks`
    place it in a parallel group (SGLang's ParallelState fields, default a single rank); `args` override server
    arguments (default: radix cache off)."""
    from sglang.srt.distributed.parallel_state_wrapper import ParallelState
    from sglang.srt.layers.attention.linear.gdn_backend import GDNAttnBackend

    args = server_args(**{"speculative_eagle_topk": 1 if draft_tokens else None, "disable_radix_cache": True, **args})
    runner = SimpleNamespace(device=DEVICE, server_args=args, is_draft_worker=False, req_to_token_pool=pool,
                             token_to_kv_pool=None, model_config=None, ps=ParallelState.trivial(**(ranks or {})))
    return GDNAttnBackend(runner)


def new_layers(s: Shapes, gen: torch.Generator) -> list:
    """SGLang's RadixLinearAttention per GDN layer, with random conv weights, decays and gates."""
    from sglang.srt.layers.radix_linear_attention import RadixLinearAttention

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    return [RadixLinearAttention(i, s.H, s.H, s.HV, s.K, s.K, s.V, conv_weights=rand(s.conv_dim, s.conv_kernel,
                                 scale=0.5), bias=rand(s.conv_dim, scale=0.1), activation="silu",
                                 A_log=rand(s.HV, scale=0.5), dt_bias=rand(s.HV, scale=0.5)) for i in range(s.layers)]


def batch(mode: str, req_slots: list[int], seq_lens: list[int], extend_lens: list[int] | None = None,
          draft_tokens: int | None = None) -> SimpleNamespace:
    """The ForwardBatch fields SGLang's GDN metadata and forward read (mode: decode | extend | verify)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    forward_mode = {"decode": ForwardMode.DECODE, "extend": ForwardMode.EXTEND,
                    "verify": ForwardMode.TARGET_VERIFY}[mode]
    n = len(req_slots)
    fb = SimpleNamespace(forward_mode=forward_mode, batch_size=n,
                         req_pool_indices=torch.tensor(req_slots, dtype=torch.int64, device=DEVICE),
                         seq_lens=torch.tensor(seq_lens, device=DEVICE), seq_lens_cpu=torch.tensor(seq_lens),
                         mamba_track_mask=None, mamba_track_indices=None, mamba_track_seqlens=None,
                         _original_batch_size=None, spec_info=None)
    if mode == "extend":
        lens = torch.tensor(extend_lens)
        fb.extend_seq_lens, fb.extend_seq_lens_cpu = lens.to(DEVICE), lens
        fb.extend_start_loc = (torch.cumsum(lens, 0) - lens).to(DEVICE)
        fb.extend_prefix_lens = (torch.tensor(seq_lens) - lens).to(DEVICE)
        fb.input_ids = torch.zeros(int(lens.sum()), dtype=torch.int64, device=DEVICE)
    if mode == "verify":
        fb.spec_info = SimpleNamespace(draft_token_num=draft_tokens, ragged_verify_layout=None)
        fb.input_ids = torch.zeros(n * draft_tokens, dtype=torch.int64, device=DEVICE)
    return fb


def conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, conv_state_indices: torch.Tensor | None = None,
                  intermediate_conv_window: torch.Tensor | None = None,
                  intermediate_state_indices: torch.Tensor | None = None, **_: object) -> torch.Tensor:
    """Stand-in for SGLang's causal_conv1d_update Triton kernel, whose masks the Triton interpreter rejects
    ('mask has unsupported dtype'); same contract: x `[B, dim]` (decode: conv_state advanced) or `[B, dim, T]`
    (verify: conv_state kept, the window after each token stored in intermediate_conv_window[row, t])."""
    single = x.dim() == 2
    xs = x[..., None] if single else x
    out = torch.empty_like(xs)
    for i in range(xs.shape[0]):
        slot = int(conv_state_indices[i])
        if slot < 0:
            continue
        state = conv_state[slot].clone()
        for t in range(xs.shape[2]):
            window = torch.cat([state, xs[i, :, t:t + 1]], dim=1)
            y = (window * weight).sum(1) + (0 if bias is None else bias)
            out[i, :, t] = torch.nn.functional.silu(y) if activation in ("silu", "swish") else y
            state = window[:, 1:]
            if intermediate_conv_window is not None:
                intermediate_conv_window[int(intermediate_state_indices[i]), t] = state
        if intermediate_conv_window is None:
            conv_state[slot] = state
    return out[..., 0] if single else out


def conv1d_fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_states: torch.Tensor,
              query_start_loc: torch.Tensor, seq_lens_cpu: torch.Tensor, cache_indices: torch.Tensor,
              has_initial_state: torch.Tensor, activation: str | None = "silu", **_: object) -> torch.Tensor:
    """Stand-in for SGLang's prefill causal_conv1d_fn Triton kernel (the same interpreter limit): x `[dim, tokens]`
    holds the sequences starting at query_start_loc; each starts from its conv state (zeros without
    has_initial_state) and leaves it advanced, token by token through `conv1d_update`."""
    out = torch.empty_like(x)
    for i in range(len(seq_lens_cpu)):
        slots = cache_indices[i:i + 1]
        if not bool(has_initial_state[i]):
            conv_states[slots] = 0
        for t in range(int(query_start_loc[i]), int(query_start_loc[i + 1])):
            out[:, t] = conv1d_update(x[None, :, t], conv_states, weight, bias, activation, conv_state_indices=slots)[0]
    return out


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           initial_state: torch.Tensor, initial_state_indices: torch.Tensor, cu_seqlens: torch.Tensor,
                           scale: float | None = None, **_: object) -> tuple[torch.Tensor, None, None]:
    """Stand-in for SGLang's chunked GDN prefill (FLA kernels on block pointers, which the Triton interpreter no longer
    runs): q, k `[1, T, H, K]` (l2-normalized here, as SGLang asks the kernel to), v `[1, T, HV, V]`, g, beta
    `[1, T, HV]`; each sequence runs the recurrence (kvbuffer.kernels.reference.scan) from and back into
    initial_state[initial_state_indices[i]]. No per-chunk states (h): extends SGLang would snapshot mid-sequence
    (64 tokens and more) are out of its reach."""
    from kvbuffer.kernels import reference

    groups = v.shape[-2] // q.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qn = (reference.l2norm(q[0].float()) * scale).repeat_interleave(groups, dim=-2)
    kn = reference.l2norm(k[0].float()).repeat_interleave(groups, dim=-2)
    out = torch.empty(v.shape[1:], dtype=torch.float32, device=v.device)
    for i, slot in enumerate(initial_state_indices.tolist()):
        s, e = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        out[s:e], initial_state[slot] = reference.scan(qn[s:e], kn[s:e], v[0, s:e].float(), g[0, s:e].float(),
                                                       beta[0, s:e].float(), initial_state[slot])
    return out[None].to(v.dtype), None, None


CHUNK, BUFFER, DRAFTS = 4, 8, 3  # the plugin's settings in every test process (SGLang loads plugins once a process)


def load_plugin(patch: pytest.MonkeyPatch) -> None:
    """Loads the plugin the way SGLang does (the `sglang.srt.plugins` entry point, allow-listed by SGLANG_PLUGINS,
    through SGLang's own load_plugins) and, on the CPU, runs the KVBuffer kernels under the Triton interpreter and the
    stand-ins above in place of SGLang's conv and prefill kernels."""
    env = {"SGLANG_PLUGINS": "kvbuffer", "KVBUFFER_SGLANG_BUFFER_SIZE": str(BUFFER),
           "KVBUFFER_SGLANG_CHUNK_SIZE": str(CHUNK), "KVBUFFER_SGLANG_SPECULATIVE_NUM_DRAFT_TOKENS": str(DRAFTS)}
    for name, value in env.items():
        patch.setenv(name, value)
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import sglang.srt.layers.attention.linear.gdn_backend as gdn
    import sglang.srt.layers.attention.linear.kernels.gdn_triton as gdn_triton
    from kvbuffer.service.sglang.plugin import dispatch

    patch.setattr(dispatch, "KERNEL_BACKEND", "triton")
    if DEVICE == "cpu":  # on a GPU, SGLang's own kernels run
        patch.setattr(gdn, "causal_conv1d_update", conv1d_update)
        patch.setattr(gdn, "causal_conv1d_fn", conv1d_fn)
        patch.setattr(gdn_triton, "chunk_gated_delta_rule", chunk_gated_delta_rule)


@contextlib.contextmanager
def unpinned_host_memory() -> Iterator[None]:
    """SGLang's prepare_for_decode stages the radix cache's track indices and mask through pinned host memory, which
    needs an accelerator; on the CPU the same copies run from pageable memory."""
    if DEVICE != "cpu":
        yield
        return
    tensor = torch.tensor
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "tensor", lambda *args, pin_memory=False, **kwargs: tensor(*args, **kwargs))
        patch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self)
        yield


@contextlib.contextmanager
def gpu_free_server_args() -> Iterator[None]:
    """SGLang's ServerArgs resolves as on one H200, and as the service builds them, before any plugin loads: its
    resolution asks the platform whether CUDA is present and how much memory the GPU has, which a CPU cannot answer;
    and SGLang loads plugins once per process, so another test may have left the plugin's start-up check (with that
    test's plugin settings) hooked on ServerArgs. Everything else (the argument checks, the model config it reads
    from the model directory) is SGLang's own."""
    require_sglang()
    import sglang.srt.server_args as server_args

    post_init = server_args.ServerArgs.__post_init__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_args, "is_cuda", lambda: True)
        patch.setattr(server_args, "get_device_memory_capacity", lambda device=None: H200_MEMORY_MIB)
        patch.setattr(server_args.ServerArgs, "__post_init__", getattr(post_init, "__wrapped__", post_init))
        yield


class GraphRunner:
    """Stand-in for SGLang's DecodeCudaGraphRunner (CUDA graphs cannot be captured on a CPU), driving SGLang's real
    backend graph methods in its order: `init_cuda_graph_state`, then per batch size, largest first, the capture-time
    metadata (`init_forward_metadata_out_graph(in_capture=True)`) and the recorded work
    (`init_forward_metadata_in_graph` and the layers, run once as its warm-up does, on the static request-slot buffer
    SGLang leaves zero). A replay fills the static buffer (padded rows 0), runs the replay metadata
    (`init_forward_metadata_out_graph`) and re-runs the recorded work with the plugin's Python state left as it was
    before: a graph replays device work, no Python."""

    def __init__(self, backend, layers: list, mode: str, sizes: list[int], draft_tokens: int = 1) -> None:
        self.backend, self.layers, self.mode, self.draft_tokens = backend, layers, mode, draft_tokens
        max_bs = max(sizes)
        backend.init_cuda_graph_state(max_bs, max_bs * draft_tokens)
        self.req_slots = torch.zeros(max_bs, dtype=torch.int64, device=DEVICE)
        for bs in sorted(sizes, reverse=True):
            fb = self._view(bs, bs)
            backend.init_forward_metadata_out_graph(fb, in_capture=True)
            self._recorded(fb, *self._inputs(bs, torch.Generator().manual_seed(bs)))
        self.sizes = sorted(sizes)

    def _view(self, bs: int, raw_bs: int) -> SimpleNamespace:
        fb = batch(self.mode, [0] * bs, [1] * bs, draft_tokens=self.draft_tokens)
        fb.req_pool_indices, fb.num_padding = self.req_slots[:bs], bs - raw_bs
        return fb

    def _inputs(self, bs: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        tokens = bs * self.draft_tokens
        conv_dim = self.layers[0].conv_weights.shape[0]
        heads = self.layers[0].num_v_heads
        return tuple(torch.randn(tokens, dim, generator=gen).to(DEVICE) for dim in (conv_dim, heads, heads))

    def _recorded(self, fb: SimpleNamespace, mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> list:
        self.backend.init_forward_metadata_in_graph(fb)
        forward = self.backend.forward_decode if self.mode == "decode" else self.backend.forward_extend
        return [forward(layer, fb, mixed, a, b) for layer in self.layers]

    def replay(self, req_slots: list[int], mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> list:
        """Outputs of the real rows (`mixed`, a, b hold their tokens; padded rows get zeros)."""
        raw = len(req_slots)
        bs = next(size for size in self.sizes if size >= raw)
        self.req_slots[:raw] = torch.tensor(req_slots, device=DEVICE)
        self.req_slots[raw:bs] = 0
        fb = self._view(bs, raw)
        self.backend.init_forward_metadata_out_graph(fb)
        pad = (bs - raw) * self.draft_tokens
        inputs = [torch.cat([x, x.new_zeros(pad, x.shape[1])]) for x in (mixed, a, b)]
        rt = getattr(self.backend, "_kvbuffer", None)
        python_state = dict(vars(rt)) if rt is not None else {}
        outs = self._recorded(fb, *inputs)
        if rt is not None:
            vars(rt).update(python_state)
        return [out[:, : raw * self.draft_tokens] if out.dim() == 4 else out[: raw * self.draft_tokens] for out in outs]
