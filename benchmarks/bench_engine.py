"""Native-engine benchmark: decode speed by path, concurrency under a state-memory budget, state held per request.

Tables (markdown, to paste into docs/BENCHMARKS.md):
  1. decode throughput and time per output token at batch 1..256: kvbuffer (buffered and stateless paths) vs
     recurrent, decode steps replayed from CUDA graphs and overlapped with the host work of the next step
     (`--no-cuda-graphs`: every step eager and synchronous), with the share of the
     forward's device time spent in the Gated DeltaNet layers (torch.profiler over eager steps);
  2. maximum concurrent requests under one fixed state-memory budget with 4 speculative draft tokens:
     KVBuffer (checkpoint + buffer) vs a recurrent baseline that keeps one state per draft token;
  3. state memory held per request, measured on the engine, for contexts under buffer_size and beyond.

The model has Qwen3-Next-80B-A3B's attention and Gated DeltaNet shapes (hidden 2048; GDN 16 key / 32 value
heads of dim 128; attention 16 heads, 2 KV heads of dim 256) with fewer layers and experts, random weights,
bf16. On CUDA the KVBuffer ops run the Triton kernels. `--device cpu --tiny` is the CPU smoke test.

    python benchmarks/bench_engine.py                      # GPU, full tables
    python benchmarks/bench_engine.py --no-cuda-graphs     # table 1 with every step eager, to compare
    python benchmarks/bench_engine.py --device cpu --tiny  # smoke test on the embedded tiny model
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from kvbuffer.kernels.fold import _fold_kernel
from kvbuffer.kernels.step import _block_apply_kernel, _decode_apply_kernel, _decode_scores_kernel, _scores_kernel
from kvbuffer.service.engine.api import GenerateRequest, SamplingParams
from kvbuffer.service.engine.config import EngineConfig
from kvbuffer.service.engine.core import EngineCore, dtype_name
from kvbuffer.service.engine.memory import buffer_bytes, state_bytes
from kvbuffer.service.model import LoadedModel, ModelConfig, empty_model, tiny
from kvbuffer.service.model.tokenizer import ByteTokenizer
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

MiB = 2**20
T = TypeVar("T")

# Qwen3-Next-80B-A3B's shapes, 8 layers (3 GDN : 1 attention, as in the real model) and 32 of its 512 experts
BENCH_MODEL = {
    **tiny.CONFIG,
    "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 8,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
    "intermediate_size": 5120, "num_experts": 32, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "mlp_only_layers": [],
}


def build_model(tiny_model: bool, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    cfg = ModelConfig.from_dict(tiny.CONFIG if tiny_model else BENCH_MODEL)
    model = empty_model(cfg, device, dtype)
    tiny.init_seeded(model, seed=0)
    return LoadedModel("bench", model, ByteTokenizer(), cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def annotated(fn: Callable[..., T], name: str) -> Callable[..., T]:
    """`fn` with each call recorded as a torch.profiler range called `name`."""
    def call(*args, **kwargs) -> T:
        with record_function(name):
            return fn(*args, **kwargs)
    return call


# the Triton kernels behind kvbuffer.kernels.ops (decode, verify, fold; prefill is fla-core's)
KVBUFFER_KERNELS = {kernel.fn.__name__ for kernel in (_decode_scores_kernel, _decode_apply_kernel, _scores_kernel,
                                                     _block_apply_kernel, _fold_kernel)}


def profile_gdn(core: EngineCore, device: torch.device, steps: int) -> tuple[float, float, float]:
    """Device seconds per step in the Gated DeltaNet layers, in the whole forward, and in the KVBuffer kernels
    (CPU seconds on CPU, no kernel split), from torch.profiler over `steps` eager steps: inside a replayed CUDA
    graph the layers cannot be told apart, and the eager steps launch the same kernels. torch ops count toward
    the range of the call that launched them; Triton launches bypass torch's op tracking, so the ranges miss the
    KVBuffer kernels, which are added to both by kernel name."""
    runner, layers = core.runner, core.loaded.model.gdn_layers()
    graphs, run = runner.graphs, runner.run
    runner.graphs, runner.run = None, annotated(run, "forward")
    for layer in layers:
        layer.forward = annotated(layer.forward, "gdn")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                core.step()
            sync(device)
    finally:
        runner.graphs, runner.run = graphs, run
        for layer in layers:
            del layer.forward  # the class's forward again
    seconds = {"gdn": 0.0, "forward": 0.0}
    kernels = 0.0
    for event in prof.events():
        if event.name in seconds and event.device_type == DeviceType.CPU:  # not the GPU-side copy of a range
            seconds[event.name] += (event.device_time_total if device.type == "cuda" else event.cpu_time_total) / 1e6
        elif event.name in KVBUFFER_KERNELS and event.device_type == DeviceType.CUDA:
            kernels += event.time_range.elapsed_us() / 1e6
    return (seconds["gdn"] + kernels) / steps, (seconds["forward"] + kernels) / steps, kernels / steps


def add_requests(core: EngineCore, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i in range(batch):
        prompt = torch.randint(0, 256, (prompt_len,), generator=gen).tolist()
        req = GenerateRequest(f"r{i}", prompt_token_ids=tuple(prompt),
                              sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        core.add(req, core.validate(req))


def engine_config(args: argparse.Namespace, batch: int, prompt_len: int, **overrides) -> EngineConfig:
    """Every step of a table 1 run fits one batch; decode steps replay CUDA graphs unless --no-cuda-graphs."""
    return EngineConfig(device=args.device, dtype=args.dtype, buffer_size=args.buffer_size,
                        chunk_size=args.chunk_size, max_running_requests=batch,
                        max_num_batched_tokens=max(2048, batch * prompt_len),
                        max_context_length=prompt_len + args.warmup + 2 * args.chunk_size + args.steps + 64,
                        memory_budget_bytes=args.memory_budget_mib * MiB,
                        cuda_graph_max_batch=0 if args.no_cuda_graphs else batch, **overrides)


def measure(core: EngineCore, device: torch.device, warmup: int, profiled: int, steps: int
            ) -> tuple[float, float, float, float, dict[str, int]]:
    """Median seconds per step over `steps` timed steps, the device seconds per step in GDN layers, in the forward
    and in the KVBuffer kernels from `profiled` eager steps before them (`profile_gdn`), and the timed tokens by
    decode path. Steps are not synchronized one by one: decode steps that replay graphs overlap the host work of
    one step with the device work of the next (core.py), and a step's wall time is the pipeline's period. Medians,
    as a step now and then stalls several times over (allocator, garbage collector, the capture of a CUDA graph
    for a new shape)."""
    while any(not s.in_decode for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()  # prefill
    for _ in range(warmup):
        core.step()
    gdn, device_forward, kernels = profile_gdn(core, device, profiled)
    before = dict(core.stats().tokens_by_path)
    step_s = []
    sync(device)
    for _ in range(steps):
        t0 = time.perf_counter()
        core.step()
        step_s.append(time.perf_counter() - t0)
    if core.runner.graphs is not None:
        core.step()  # reads back the last timed step (graph decode steps overlap); its own tokens are not counted
    paths = {k: v - before[k] for k, v in core.stats().tokens_by_path.items()}
    return statistics.median(step_s), gdn, device_forward, kernels, paths


def decode_table(args: argparse.Namespace, loaded: LoadedModel, device: torch.device) -> None:
    """Steps timed once every request decodes. Buffered and recurrent: warm-up includes a flush (kernel
    variants compile on first use), the profiled steps are one chunk_size (one flush at its real rate), and the
    timed steps, a multiple of chunk_size, include flushes at their real rate. Stateless: 8 profiled steps and as
    many timed steps as keep the context under buffer_size."""
    long_prompt, short_prompt, few = args.buffer_size + 32, 8, 8
    stateless_steps = min(args.steps, args.buffer_size - short_prompt - args.warmup - few - 2)
    variants = [("recurrent", "recurrent", long_prompt, args.warmup + args.chunk_size, few, args.steps),
                ("kvbuffer", "buffered", long_prompt, args.warmup + args.chunk_size, args.chunk_size, args.steps),
                ("kvbuffer", "stateless", short_prompt, args.warmup, few, stateless_steps)]
    graphs = "off: every step eager" if args.no_cuda_graphs else "on: decode steps replay CUDA graphs"
    print("\n### 1. Decode: time per output token and throughput\n")
    print(f"{args.model_desc}; buffer_size {args.buffer_size}, chunk_size {args.chunk_size}; CUDA graphs {graphs}.\n")
    print("step: the whole engine step (scheduling, forward, sampling, streaming), = TPOT as every request "
          "decodes one token per step, the median over the timed steps (not synchronized one by one: with graphs a "
          "decode step's host work overlaps the device work of the next); host not hidden: step minus forward "
          "device. GDN, forward and KVBuffer kernels device: kernel time per step "
          "inside the Gated DeltaNet layers, in the whole forward, and in the KVBuffer (or recurrent) kernels alone "
          "(CPU time on a CPU), GDN share the first two's ratio, from torch.profiler over eager steps run just "
          "before the timed ones (inside a replayed graph the layers cannot be told apart; eager steps launch the "
          "same kernels).\n")
    print("| batch | decode_mode | path | timed steps | step (ms) | tokens/s | GDN device (ms) "
          "| forward device (ms) | GDN share | KVBuffer kernels device (ms) | host not hidden (ms) "
          "| step vs recurrent |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batches:
        base = None
        for mode, path, prompt_len, warmup, profiled, steps in variants:
            core = EngineCore(engine_config(args, batch, prompt_len, decode_mode=mode), loaded)
            if core.plan.request_slots < batch:
                print(f"| {batch} | {mode} | {path} | memory budget too small (--memory-budget-mib) "
                      "| | | | | | | | |")
                continue
            add_requests(core, batch, prompt_len, warmup + profiled + steps + 2)
            step, gdn, device_forward, kernels, paths = measure(core, device, warmup, profiled, steps)
            assert paths[path] == batch * steps, f"timed tokens by path: {paths}, expected all {path}"
            assert args.no_cuda_graphs or core.runner.graphs.steps, "CUDA graphs on, yet no decode step used one"
            base = step if mode == "recurrent" else base
            ratio = f"{step / base:.2f}" if base else "-"
            print(f"| {batch} | {mode} | {path} | {steps} | {step * 1e3:.2f} | {batch / step:.0f} | "
                  f"{gdn * 1e3:.2f} | {device_forward * 1e3:.2f} | {gdn / device_forward:.0%} "
                  f"| {kernels * 1e3:.2f} | {(step - device_forward) * 1e3:.2f} | {ratio} |", flush=True)


def concurrency_table(args: argparse.Namespace, cfg: ModelConfig, dtype: torch.dtype) -> None:
    """Per request, KVBuffer holds its buffer always and a checkpoint once its context reaches buffer_size;
    drafts need no extra state. The recurrent baseline holds its state plus one state per draft token.
    Bytes come from the engine's own pool accounting (conv states left out: one per request in KVBuffer, and
    SGLang's baseline keeps one per draft token too, so leaving them out favours the baseline). The last column
    counts checkpoint states alone, as a state pool sized in slots does (buffers then live beside the KV cache)."""
    drafts, budget = 4, args.state_budget_mib * MiB
    print("\n### 2. Concurrent requests under one state-memory budget, speculation with 4 draft tokens\n")
    print(f"State-memory budget {args.state_budget_mib} MiB over {len(cfg.linear_layers)} GDN layers.\n")
    print("| buffer_size | chunk_size | context | KVBuffer MiB/request | recurrent + drafts MiB/request "
          "| KVBuffer requests | recurrent requests | ratio | ratio in state slots |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for chunk in sorted({args.chunk_size, 16}):
        for buffer_size in sorted({chunk + drafts, max(args.buffer_size, chunk + drafts)}):
            ec = EngineConfig(buffer_size=buffer_size, chunk_size=chunk, speculative_algorithm="ngram",
                              speculative_num_draft_tokens=drafts)
            buffer = len(cfg.linear_layers) * buffer_bytes(cfg, ec, dtype)
            state = len(cfg.linear_layers) * state_bytes(cfg)
            recurrent = (1 + drafts) * state
            for label, kv, slots in ((f"< {buffer_size} tokens", buffer, "no slot"),
                                     (f">= {buffer_size} tokens", buffer + state, f"{1 + drafts:.1f}x")):
                n_kv, n_rec = budget // kv, budget // recurrent
                print(f"| {buffer_size} | {chunk} | {label} | {kv / MiB:.2f} | {recurrent / MiB:.2f} | {n_kv} | "
                      f"{n_rec} | {n_kv / max(n_rec, 1):.1f}x | {slots} |")


def state_memory_table(args: argparse.Namespace, loaded: LoadedModel, device: torch.device) -> None:
    """Measured: peak checkpoint slots held while requests run, times the bytes of one slot."""
    print("\n### 3. State memory held per request (measured on the engine)\n")
    print("| decode_mode | context (prompt + generated) | requests | peak checkpoint slots | "
          "checkpoint MiB/request | buffer + conv MiB/request |")
    print("| --- | --- | --- | --- | --- | --- |")
    batch = min(args.batches[-1], 16)
    short_new = args.buffer_size // 2
    cases = [("kvbuffer", 8, short_new), ("kvbuffer", args.buffer_size + 32, 8),
             ("recurrent", 8, short_new)]
    for mode, prompt_len, new in cases:
        core = EngineCore(engine_config(args, batch, prompt_len, decode_mode=mode), loaded)
        add_requests(core, batch, prompt_len, new)
        peak = 0
        while core.has_work():
            core.step()
            peak = max(peak, core.memory.state_slots_used)
        plan = core.plan
        print(f"| {mode} | {prompt_len + new} | {batch} | {peak} | "
              f"{peak * plan.state_slot_bytes / batch / MiB:.2f} | {plan.request_slot_bytes / MiB:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="the embedded tiny model and small batches (smoke test)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 2 4 ... 256; tiny: 1 2 4 8)")
    p.add_argument("--buffer-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--steps", type=int, help="timed decode steps (default 2 * chunk_size; tiny: chunk_size)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--memory-budget-mib", type=int, help="engine pool budget (default 40960; tiny: 256)")
    p.add_argument("--state-budget-mib", type=int, default=8192, help="state-memory budget of table 2")
    p.add_argument("--tables", default="123", help="which tables to print, e.g. 13")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="table 1 with every step eager (cuda_graph_max_batch=0), to compare with graph replay")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available; use --device cpu --tiny for the CPU smoke test")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    args.dtype = dtype_name(dtype)
    args.batches = args.batches or ([1, 2, 4, 8] if args.tiny else [1, 2, 4, 8, 16, 32, 64, 128, 256])
    args.steps = args.steps or (args.chunk_size if args.tiny else 2 * args.chunk_size)
    args.memory_budget_mib = args.memory_budget_mib or (256 if args.tiny else 40960)
    loaded = build_model(args.tiny, device, dtype)
    cfg = loaded.config
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    args.model_desc = (f"{'tiny' if args.tiny else 'Qwen3-Next shapes'}: hidden {cfg.hidden_size}, "
                       f"{len(cfg.linear_layers)} GDN + {len(cfg.attention_layers)} attention layers, "
                       f"{cfg.num_experts} experts, {args.dtype} on {where}")
    print(f"# bench_engine: {args.model_desc}")
    if "1" in args.tables:
        decode_table(args, loaded, device)
    if "2" in args.tables:
        concurrency_table(args, cfg, dtype)
    if "3" in args.tables:
        state_memory_table(args, loaded, device)


if __name__ == "__main__":
    main()
