"""SGLang 0.5.17 end to end on one GPU, three GDN decode modes in one run: SGLang's default recurrent decode
(overlap scheduler on), SGLang's ReplaySSM (which needs the overlap scheduler off and the no_buffer radix strategy)
and the KVBuffer plugin (overlap on). Prints tables and writes bench_sglang.json into --out.

    # on the GPU machine (the repo root; .sglang from shared/anchors/get_sglang_runtime.sh .sglang):
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .sglang/*.whl
    PYTHONPATH=/tmp/site CUDA_HOME=/usr/local/cuda python3 benchmarks/bench_sglang.py --quick --out $OUT

Steps: (1) the smoke test: tests/test_sglang_plugin.py on the GPU (the plugin's kernels inside SGLang's real GDN
backend against SGLang's recurrent kernels, decode across flushes and verify + commit), its verdict recorded;
(2) a random-weight Qwen3-Next saved by transformers (6 GDN + 2 attention layers, the real model's 3:1 ratio;
--layers adds depths); (3) one engine per mode, in its own process (SGLang's plugin loader runs once per process),
timing decode steps at each batch size with CUDA graphs ((generate 1 + S tokens - generate 1) / S), then teacher
forcing; with --profile, the GDN kernels' share of a profiled step. --spec runs, instead of (3), chain speculation
(NGRAM, speculative_ngram_max_bfs_breadth 1, 4 draft tokens) for recurrent and KVBuffer at B = 1, 8, 64: time per
generated token, accept length and the per-request state memory for drafts (about 3 minutes after the smoke test):

    PYTHONPATH=/tmp/site python3 benchmarks/bench_sglang.py --quick --spec --skip-smoke --out $OUT/spec

Accuracy by teacher forcing (random weights give near-tied logits, so free greedy runs of two decode paths part
after a few tokens): `TeacherForcing`, an SGLang custom logit processor, records log_softmax of the raw logits at
the token it forces. The recurrent mode runs first with its own greedy tokens (and once more forced to them: the
harness's own floor, bit-identical expected), then ReplaySSM and KVBuffer are forced to the recurrent tokens. 32
prompts of 16..200 random tokens, 64 tokens each; per mode: mean and p99 |delta log-probability| over all forced
positions, the fraction bit-identical, and the mean over positions 1-16 (before KVBuffer's first flush) and 17-64.
The plugin is installed for the KVBuffer mode only, as an import shim (kvbuffer -> this checkout, with its entry
point), so the two SGLang modes run SGLang untouched.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parent.parent
MODES = ("recurrent", "replayssm", "kvbuffer")  # recurrent first: the others are forced to its tokens
SPEC_DRAFTS = 4  # speculative_num_draft_tokens of the NGRAM rows (SGLang and the plugin)
CFG = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "torch_dtype": "bfloat16",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 8,
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000000, "partial_rotary_factor": 0.25,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "decoder_sparse_step": 1,
    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts_per_tok": 10,
    "num_experts": 32, "norm_topk_prob": True, "mlp_only_layers": [], "full_attention_interval": 4,
    "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
}
GDN_KERNELS = ("causal_conv1d_update", "fused_recurrent_gated_delta_rule", "replayssm", "_decode_apply_kernel",
               "_decode_scores_kernel", "_fold_kernel", "fused_sigmoid_gating")


def save_weights(layers: int) -> str:
    """A random, properly initialised Qwen3-Next with `layers` layers (3 GDN : 1 attention), saved once."""
    path = f"/tmp/qwen3next-rand-{layers}"
    if not glob.glob(f"{path}/*.safetensors"):
        import torch
        from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

        torch.manual_seed(0)
        cfg = {k: v for k, v in CFG.items() if k not in ("architectures", "model_type", "torch_dtype")}
        with torch.device("cuda"):
            model = Qwen3NextForCausalLM(Qwen3NextConfig(**{**cfg, "num_hidden_layers": layers})).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
    config = Path(f"{path}/config.json")  # SGLang 0.5.17 reads full_attention_interval, which transformers drops
    config.write_text(json.dumps({**json.loads(config.read_text()), **CFG, "num_hidden_layers": layers}))
    return path


def plugin_shim() -> str:
    """A site folder where `import kvbuffer` resolves to this checkout and SGLang finds the plugin's entry point
    (the GPU machine needs no build or install)."""
    site = Path(tempfile.mkdtemp(prefix="kvb_site_"))
    pkg = site / "kvbuffer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "kernels").symlink_to(REPO / "kernels")
    (pkg / "service").symlink_to(REPO / "service")
    info = site / "kvbuffer-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvbuffer\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[sglang.srt.plugins]\nkvbuffer = kvbuffer.service.sglang.plugin:register\n")
    return str(site)


def smoke(shim: str) -> dict:
    path = [shim, str(REPO / "tests"), os.environ.get("PYTHONPATH")]  # no empty entry: it would mean the cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    t0 = time.time()
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                              str(REPO / "tests" / "test_sglang_plugin.py")], env=env, cwd="/tmp",
                             capture_output=True, text=True, timeout=420)
        tail = (run.stdout + run.stderr).strip().splitlines()[-15:]
        verdict = "PASS" if run.returncode == 0 else f"FAIL (rc {run.returncode})"
    except subprocess.TimeoutExpired:
        tail, verdict = [], "FAIL (timeout)"
    print(f"[smoke] plugin vs SGLang recurrent inside SGLang's GDN backend on the GPU: {verdict} "
          f"({time.time() - t0:.0f}s)", flush=True)
    if verdict != "PASS":
        print("\n".join(tail), flush=True)
    return {"verdict": verdict, "tail": tail}


class TeacherForcing:
    """An SGLang custom logit processor (engine flag enable_custom_logit_processor) for teacher forcing. SGLang ships
    it to the scheduler by dill, so it is self-contained (imports inside `__call__`). Per row it reads its request's
    custom params {"dir", "row", "forced"}, appends "step token logprob" (log_softmax of the raw logits in fp32 at
    the token) to `dir/<row>-<rid>`, then forces that token: `forced[step]`, or the row's own greedy token where
    `forced` is empty. Steps are counted per request id here (the request's output_ids lag under the overlap
    scheduler); SGLang deserializes a processor string once per process (its `_cache_from_str` is an lru_cache), so
    the class-level counter lives as long as the scheduler. Steps past `forced` (the overlap scheduler's extra step
    of a finished request) are neither recorded nor forced."""

    steps: ClassVar[dict] = {}  # request id -> steps seen

    def __call__(self, logits, custom_param_list=None):
        import os

        import torch

        rows, tokens, files = [], [], []
        greedy = logits.argmax(-1).tolist()
        for i, params in enumerate(custom_param_list or []):
            if not params or "dir" not in params:
                continue
            rid = params["__req__"].rid
            step = self.steps.get(rid, 0)
            self.steps[rid] = step + 1
            forced = params.get("forced") or []
            if forced and step >= len(forced):
                continue
            rows.append(i)
            tokens.append(forced[step] if forced else greedy[i])
            files.append((os.path.join(params["dir"], f"{params['row']}-{rid}"), step))
        if not rows:
            return logits
        index = torch.tensor(rows, device=logits.device)
        chosen = torch.tensor(tokens, device=logits.device)
        logprobs = torch.log_softmax(logits[index].float(), dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
        for (path, step), token, logprob in zip(files, tokens, logprobs, strict=True):
            with open(path, "a") as f:
                f.write(f"{step} {token} {logprob!r}\n")
        logits[index] = float("-inf")
        logits[index, chosen] = 0.0
        return logits


def processor_string() -> str:
    """`TeacherForcing` as SGLang's `CustomLogitProcessor.to_str` writes a processor (dill, by value from __main__)."""
    import dill

    return json.dumps({"callable": dill.dumps(TeacherForcing, recurse=True).hex()})


def read_forced(directory: str, rows: int, tokens: int) -> dict:
    """Tokens and log-probabilities `TeacherForcing` recorded per row (its first `tokens` steps, in order)."""
    out: dict = {"tokens": [], "logprobs": []}
    for row in range(rows):
        files = glob.glob(os.path.join(directory, f"{row}-*"))
        if len(files) != 1:
            raise RuntimeError(f"teacher forcing: {len(files)} record files for row {row} in {directory}")
        lines = [line.split() for line in Path(files[0]).read_text().splitlines()][:tokens]
        if [int(step) for step, _, _ in lines] != list(range(tokens)):
            raise RuntimeError(f"teacher forcing: row {row} recorded steps out of order or short ({files[0]})")
        out["tokens"].append([int(t) for _, t, _ in lines])
        out["logprobs"].append([float(lp) for _, _, lp in lines])
    return out


def forcing_prompts(n: int = 32) -> list[list[int]]:
    """`n` random prompts of 16..200 tokens: some contexts are shorter than the buffer, most start past it."""
    rng = random.Random(7)
    return [[rng.randrange(1000, 100000) for _ in range(16 + (200 - 16) * i // (n - 1))] for i in range(n)]


def teacher_forced(eng, prompts: list, forced: list | None, tokens: int, processor: str) -> dict:
    """One greedy pass under `TeacherForcing`: forced to `forced` (one token list per prompt), or free (None)."""
    directory = tempfile.mkdtemp(prefix="tf_")
    params = [{"max_new_tokens": tokens, "temperature": 0.0, "ignore_eos": True,
               "custom_params": {"dir": directory, "row": i, "forced": forced[i] if forced else []}}
              for i in range(len(prompts))]
    outs = eng.generate(input_ids=prompts, sampling_params=params, custom_logit_processor=processor)
    rec = read_forced(directory, len(prompts), tokens)
    rec["output_mismatches"] = sum(o["output_ids"][:tokens] != t for o, t in zip(outs, rec["tokens"], strict=True))
    return rec


def engine_kwargs(mode: str, model: str, args: argparse.Namespace) -> dict:
    batches = args.spec_batches if args.spec else args.batches
    kw = dict(model_path=model, skip_tokenizer_init=True, tp_size=1, attention_backend="triton",
              sampling_backend="pytorch", grammar_backend="none", mem_fraction_static=0.6, context_length=4096,
              max_running_requests=max(batches), cuda_graph_max_bs_decode=max(batches),
              log_level="warning", random_seed=0, enable_custom_logit_processor=True)
    if mode == "replayssm":
        kw.update(enable_linear_replayssm=True, mamba_radix_cache_strategy="no_buffer", disable_overlap_schedule=True)
    if mode == "kvbuffer" and not args.radix:
        kw.update(disable_radix_cache=True)  # --radix: SGLang's default (extra_buffer), which the plugin serves
    if args.spec:  # chain drafts: SGLang sets speculative_eagle_topk = the breadth; the plugin refuses > 1
        kw.update(speculative_algorithm="NGRAM", speculative_num_draft_tokens=SPEC_DRAFTS,
                  speculative_ngram_max_bfs_breadth=1, speculative_ngram_min_bfs_breadth=1, disable_radix_cache=True)
    return kw


def profile_share(eng, prompts: list, steps: int, out_dir: str) -> dict:
    """The GDN kernels' share of GPU kernel time over a few profiled decode steps (SGLang's profiler traces)."""
    eng.start_profile(output_dir=out_dir, num_steps=steps, activities=["GPU"])
    eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 3 * steps, "temperature": 0.0,
                                                     "ignore_eos": True})
    time.sleep(2)
    gdn = total = 0.0
    for trace in glob.glob(f"{out_dir}/**/*.json*", recursive=True):
        opener = gzip.open if trace.endswith(".gz") else open
        with opener(trace, "rt") as f:
            events = json.load(f).get("traceEvents", [])
        for ev in events:
            if ev.get("cat") == "kernel":
                total += ev.get("dur", 0.0)
                gdn += ev.get("dur", 0.0) if any(k in ev.get("name", "") for k in GDN_KERNELS) else 0.0
    if total == 0:
        raise RuntimeError(f"no kernel events in the traces under {out_dir}")
    return {"gdn_share": gdn / total, "gdn_us": gdn, "kernel_us": total}


def timed_steps(eng, prompts: list, steps: int) -> tuple[float, list]:
    """Seconds per decode step ((generate 1 + steps tokens - generate 1) / steps) after a warm-up; the timed outputs."""

    def sp(n: int) -> dict:
        return {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}

    eng.generate(input_ids=prompts, sampling_params=sp(8))  # graphs, JIT, autotune
    t = time.perf_counter()
    eng.generate(input_ids=prompts, sampling_params=sp(1))
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    outs = eng.generate(input_ids=prompts, sampling_params=sp(steps + 1))
    return (time.perf_counter() - t - t1) / steps, outs


def worker(args: argparse.Namespace) -> None:
    """One mode's engine: decode step times and teacher forcing (or, with --spec, NGRAM speculation)."""
    import sglang as sgl

    eng = sgl.Engine(**engine_kwargs(args.worker, args.model, args))
    res: dict = {"mode": args.worker, "model": args.model, "steps": args.steps, "spec": args.spec}
    try:
        if args.spec:
            spec_worker(eng, args, res)
        else:
            decode_worker(eng, args, res)
    finally:
        eng.shutdown()
    Path(args.result).write_text(json.dumps(res))


def decode_worker(eng, args: argparse.Namespace, res: dict) -> None:
    rng = random.Random(1)
    for B in args.batches:
        prompts = [[rng.randrange(1000, 100000) for _ in range(32)] for _ in range(B)]
        step, _ = timed_steps(eng, prompts, args.steps)
        res[f"B{B}"] = {"decode_step_ms": step * 1e3}
        print(f"[{args.worker}] B={B} decode step {step * 1e3:.3f} ms", flush=True)
    prompts, processor = forcing_prompts(), processor_string()
    forced = json.loads(Path(args.forced).read_text())["forced"]["tokens"] if args.forced else None
    res["forced"] = teacher_forced(eng, prompts, forced, args.forced_tokens, processor)
    if forced is None:  # the harness's floor: the same engine forced to the tokens it just chose, prefill afresh
        eng.flush_cache()
        res["forced_again"] = teacher_forced(eng, prompts, res["forced"]["tokens"], args.forced_tokens, processor)
    if args.profile:
        try:
            res["profile"] = profile_share(eng, [p[:32] for p in prompts], 5,
                                           tempfile.mkdtemp(prefix=f"prof_{args.worker}_"))
        except Exception as e:  # the table says why instead of a number
            res["profile"] = {"error": f"{type(e).__name__}: {e}"}


def spec_worker(eng, args: argparse.Namespace, res: dict) -> None:
    """NGRAM chain speculation: repetitive prompts (a short random pattern repeated) so its drafts get accepted."""
    rng = random.Random(3)
    for B in args.spec_batches:
        prompts = []
        for _ in range(B):
            pattern = [rng.randrange(1000, 100000) for _ in range(8)]
            prompts.append(pattern * 8)
        step, outs = timed_steps(eng, prompts, args.steps)
        verifies = sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs)
        generated = sum(o["meta_info"]["completion_tokens"] for o in outs)
        res[f"B{B}"] = {"ms_per_token": step * 1e3, "accept_length": generated / verifies if verifies else None}
        print(f"[{args.worker}+NGRAM] B={B} {step * 1e3:.3f} ms per generated token, "
              f"accept length {res[f'B{B}']['accept_length']}", flush=True)
    if args.worker == "kvbuffer":
        import torch
        from kvbuffer.kernels import BufferPool
        from kvbuffer.service.sglang.plugin.settings import PluginSettings

        buffer = BufferPool.allocate(1, PluginSettings.from_env().buffer_size, CFG["linear_num_key_heads"],
                                     CFG["linear_num_value_heads"], CFG["linear_key_head_dim"],
                                     CFG["linear_value_head_dim"], key_dtype=torch.bfloat16, device="meta")
        res["plugin_buffer_bytes_per_layer"] = buffer.bytes_per_slot()  # what attach() allocates per request


def draft_state_bytes_per_layer() -> dict:
    """SGLang's per-request state memory for drafts, per GDN layer: `intermediate_ssm` keeps one fp32 state per draft
    token ([layers, slots + 1, drafts, HV, V, K], sglang/srt/mem_cache/memory_pool.py, MambaPool.__init__); the
    checkpoint itself is one state."""
    state = CFG["linear_num_value_heads"] * CFG["linear_value_head_dim"] * CFG["linear_key_head_dim"] * 4
    return {"checkpoint": state, "intermediate_ssm": SPEC_DRAFTS * state}


def forced_delta(base: dict, other: dict, split: int) -> dict:
    """|delta log-probability| of `other` against `base` at every forced position (both scored the same tokens)."""
    deltas, early, late, same = [], [], [], 0
    for b_lp, o_lp in zip(base["logprobs"], other["logprobs"], strict=True):
        for pos, (x, y) in enumerate(zip(b_lp, o_lp, strict=True), start=1):
            d = abs(x - y)
            deltas.append(d)
            (early if pos <= split else late).append(d)
            same += x == y
    ordered = sorted(deltas)
    return {"mean": sum(deltas) / len(deltas), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "identical": same / len(deltas), "mean_early": sum(early) / max(len(early), 1),
            "mean_late": sum(late) / max(len(late), 1), "positions": len(deltas)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="one depth (8 layers), 64 steps per batch, no profile")
    ap.add_argument("--layers", type=int, nargs="+", default=[8])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--forced-tokens", type=int, default=64, help="tokens per prompt under teacher forcing")
    ap.add_argument("--buffer-size", type=int, default=24)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--profile", action="store_true", help="GDN share of the step from SGLang's profiler")
    ap.add_argument("--spec", action="store_true",
                    help="instead of the decode modes: NGRAM chain speculation, recurrent vs KVBuffer")
    ap.add_argument("--spec-batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--skip-smoke", action="store_true")
    ap.add_argument("--radix", action="store_true",
                    help="KVBuffer mode keeps SGLang's default radix cache (extra_buffer; the plugin flushes each "
                    "request's buffer on the steps SGLang snapshots its state); without it, the radix cache is off")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--forced", help=argparse.SUPPRESS)  # the recurrent mode's result: the tokens to force
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.layers, args.steps, args.profile = [8], 64, False
    os.makedirs(args.out, exist_ok=True)
    shim = plugin_shim()
    report: dict = {"smoke": None if args.skip_smoke else smoke(shim), "runs": {}, "spec": {}}
    for layers in args.layers:
        model = save_weights(layers)
        if args.spec:
            spec = {mode: run_worker(mode, model, layers, args, shim, spec=True) for mode in ("recurrent", "kvbuffer")}
            report["spec"][layers] = spec
            spec_table(layers, spec, args.spec_batches)
        else:
            runs = {"recurrent": run_worker("recurrent", model, layers, args, shim)}
            tokens = result_path(args.out, "recurrent", layers, spec=False)
            for mode in MODES[1:]:
                runs[mode] = (run_worker(mode, model, layers, args, shim, forced=tokens)
                              if "forced" in runs["recurrent"] else {"error": "no recurrent tokens to force"})
            report["runs"][layers] = runs
            table(layers, runs, args.batches, args.chunk_size)
        Path(args.out, "bench_sglang.json").write_text(json.dumps(report, indent=1))


def result_path(out: str, mode: str, layers: int, spec: bool) -> str:
    return os.path.join(out, f"sglang_{mode}_{layers}{'_ngram' if spec else ''}.json")


def run_worker(mode: str, model: str, layers: int, args: argparse.Namespace, shim: str, spec: bool = False,
               forced: str | None = None) -> dict:
    """One mode's engine in its own process (forced to the tokens in the result file `forced`, if given); its
    result, or {"error": ...}."""
    result = result_path(args.out, mode, layers, spec)
    env = dict(os.environ)
    if mode == "kvbuffer":
        env.update(SGLANG_PLUGINS="kvbuffer", KVBUFFER_SGLANG_DECODE_MODE="kvbuffer",
                   KVBUFFER_SGLANG_BUFFER_SIZE=str(args.buffer_size), KVBUFFER_SGLANG_CHUNK_SIZE=str(args.chunk_size),
                   KVBUFFER_SGLANG_SPECULATIVE_NUM_DRAFT_TOKENS=str(SPEC_DRAFTS if spec else 0),
                   PYTHONPATH=os.pathsep.join([shim, env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, __file__, "--worker", mode, "--model", model, "--result", result, "--steps",
           str(args.steps), "--forced-tokens", str(args.forced_tokens), "--batches", *map(str, args.batches),
           "--spec-batches", *map(str, args.spec_batches)]
    cmd += ["--profile"] * args.profile + ["--radix"] * args.radix + ["--spec"] * spec
    cmd += ["--forced", forced] if forced else []
    t0 = time.time()
    rc = subprocess.run(cmd, env=env, timeout=900).returncode
    print(f"[{mode}{'+NGRAM' if spec else ''}] layers={layers} done in {time.time() - t0:.0f}s (rc {rc})", flush=True)
    return json.loads(Path(result).read_text()) if rc == 0 and os.path.exists(result) else {"error": f"rc {rc}"}


def table(layers: int, runs: dict, batches: list, split: int) -> None:
    base = runs.get("recurrent", {})
    print(f"\nQwen3-Next random weights, {layers} layers ({layers * 3 // 4} GDN), H200, CUDA graphs: "
          "decode step ms (ratio to SGLang recurrent); teacher-forced |dlogprob| vs recurrent "
          f"(32 prompts x 64 tokens; early = positions 1-{split}, late = after)")
    print("| mode | " + " | ".join(f"B={b}" for b in batches) + " | mean | p99 | identical | mean early | "
          "mean late | GDN share |")
    print("| --- " * (len(batches) + 7) + "|")
    rows = dict(runs)
    if "forced_again" in base:
        rows = {"recurrent": base, "recurrent (forced again)": {**base, "forced": base["forced_again"]},
                **{m: r for m, r in runs.items() if m != "recurrent"}}
    for mode, run in rows.items():
        if "error" in run:
            print(f"| {mode} | failed: {run['error']} |")
            continue
        cells = []
        for b in batches:
            ms = run[f"B{b}"]["decode_step_ms"]
            ref = base.get(f"B{b}", {}).get("decode_step_ms")
            cells.append(f"{ms:.3f} ({ms / ref:.2f}x)" if ref else f"{ms:.3f}")
        acc = None
        if mode != "recurrent" and "forced" in base:
            acc = forced_delta(base["forced"], run["forced"], split)
            run["forced_vs_recurrent"] = acc
        prof = run.get("profile", {})
        share = f"{prof['gdn_share']:.2f}" if "gdn_share" in prof else prof.get("error", "-")
        acc_cells = (f"{acc['mean']:.2e} | {acc['p99']:.2e} | {acc['identical']:.3f} | {acc['mean_early']:.2e} | "
                     f"{acc['mean_late']:.2e}") if acc else "- | - | - | - | -"
        mismatch = run.get("forced", {}).get("output_mismatches")
        note = f" ({mismatch} outputs off the forced tokens)" if mismatch else ""
        print(f"| {mode}{note} | " + " | ".join(cells) + f" | {acc_cells} | {share} |", flush=True)


def spec_table(layers: int, runs: dict, batches: list) -> None:
    mem = draft_state_bytes_per_layer()
    gdn = layers * 3 // 4
    plugin = runs.get("kvbuffer", {}).get("plugin_buffer_bytes_per_layer")
    print(f"\nNGRAM chain speculation ({SPEC_DRAFTS} draft tokens, breadth 1), repetitive prompts, {layers} layers: "
          "ms per generated token (accept length)")
    print("| mode | " + " | ".join(f"B={b}" for b in batches) + " | state memory for drafts per request |")
    print("| --- " * (len(batches) + 2) + "|")
    base = runs.get("recurrent", {})
    for mode, run in runs.items():
        if "error" in run:
            print(f"| {mode}+NGRAM | failed: {run['error']} |")
            continue
        cells = []
        for b in batches:
            r, ref = run[f"B{b}"], base.get(f"B{b}", {}).get("ms_per_token")
            ratio = f", {r['ms_per_token'] / ref:.2f}x" if ref else ""
            acc = f"{r['accept_length']:.2f}" if r["accept_length"] else "-"
            cells.append(f"{r['ms_per_token']:.3f} ({acc}{ratio})")
        if mode == "recurrent":
            memory = f"{gdn * mem['intermediate_ssm'] / 2**20:.1f} MiB (intermediate_ssm, one state per draft)"
        else:
            memory = (f"{gdn * plugin / 2**20:.2f} MiB (KVBuffer buffer; the plugin stops SGLang allocating "
                      "intermediate_ssm)") if plugin else "-"
        print(f"| {mode}+NGRAM | " + " | ".join(cells) + f" | {memory} |", flush=True)
    print(f"(both keep the checkpoint: {gdn * mem['checkpoint'] / 2**20:.1f} MiB per request)")


if __name__ == "__main__":
    main()
